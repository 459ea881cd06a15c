"""Building on the meta device (what loading does before it assigns the file's tensors) affects only the thread that
asked for it: a server that loads a model while another thread builds modules must not get meta parameters there."""

import threading

import pytest
import torch
from torch import nn

from diffrt.loading.build import parameters_on_meta

REGISTER_PARAMETER = nn.Module.register_parameter  # torch's own


def test_parameters_on_meta_only_in_its_thread():
    inside, built_outside, other = threading.Event(), threading.Event(), {}

    def loader():
        with parameters_on_meta():
            inside.set()
            assert built_outside.wait(10)  # the other thread builds while this one is inside
            other["inside"] = nn.Linear(3, 4)
        other["after"] = nn.Linear(3, 4)

    t = threading.Thread(target=loader)
    t.start()
    assert inside.wait(10)
    outside = nn.Linear(3, 4)
    built_outside.set()
    t.join(10)
    assert outside.weight.device.type == "cpu" and outside.weight.abs().sum() > 0  # real, initialised
    assert other["inside"].weight.is_meta and other["inside"].bias.is_meta
    assert other["after"].weight.device.type == "cpu"
    assert nn.Module.register_parameter is REGISTER_PARAMETER  # restored once no thread is inside


def test_nested_and_failing_blocks_restore_normal_building():
    with pytest.raises(RuntimeError, match="boom"), parameters_on_meta():
        with parameters_on_meta():
            assert nn.Linear(2, 2).weight.is_meta
        assert nn.Linear(2, 2).weight.is_meta  # still inside the outer block
        raise RuntimeError("boom")
    assert not nn.Linear(2, 2).weight.is_meta and nn.Module.register_parameter is REGISTER_PARAMETER
    buffers = nn.BatchNorm1d(2)
    with parameters_on_meta():
        buffers = nn.BatchNorm1d(2)
    assert buffers.weight.is_meta and not buffers.running_mean.is_meta  # buffers are created normally
    assert torch.equal(buffers.running_var, torch.ones(2))
