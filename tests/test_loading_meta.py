"""Building on the meta device (what loading does before it assigns the file's tensors) affects only the thread that
asked for it: a server that loads a model while another thread builds modules must not get meta parameters there."""

import threading

import torch
from torch import nn

from diffrt.loading import build, build_module
from diffrt.models.unet import UNet2DConditionModel, UNetConfig
from tests.helpers.loading_fixtures import UNETS

REGISTER_PARAMETER = nn.Module.register_parameter  # torch's own


def test_loading_builds_on_meta_only_in_its_thread(monkeypatch):
    """The loader thread is held inside its meta-device block while the other thread builds a module."""
    config = UNETS["sd1"]
    state_dict = UNet2DConditionModel(UNetConfig.from_diffusers(config)).state_dict()
    inside, built_outside, out = threading.Event(), threading.Event(), {}
    match = build.match_state_dict

    def held_match(module, sd, source):
        assert all(p.is_meta for p in module.parameters())  # built on meta: nothing allocated or initialised
        inside.set()
        assert built_outside.wait(10)
        return match(module, sd, source)

    monkeypatch.setattr("diffrt.loading.build.match_state_dict", held_match)

    def loader():
        out["unet"] = build_module("UNet2DConditionModel", config, state_dict, "test")

    t = threading.Thread(target=loader)
    t.start()
    assert inside.wait(10)
    outside = nn.Linear(3, 4)
    built_outside.set()
    t.join(30)
    assert outside.weight.device.type == "cpu" and outside.weight.abs().sum() > 0  # real, initialised
    loaded = out["unet"]
    assert not any(p.is_meta for p in loaded.parameters())
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state_dict[key], rtol=0, atol=0)
    assert nn.Module.register_parameter is REGISTER_PARAMETER  # nothing of nn.Module was patched
