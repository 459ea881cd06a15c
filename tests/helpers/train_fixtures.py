"""Test-only: a finished training run at the "tiny" architecture (a few CPU steps per stage), for the tests that
need trained-format weights without training."""

from diffrt.train import lcm, text, unet, vae
from diffrt.train.recipes import init_run, stage_settings

TRAIN = {"vae": vae.train_vae, "text": text.train_text, "unet": unet.train_unet, "lcm": lcm.train_lcm}
TINY = {  # a couple of steps each, fast
    "vae": {"steps": 3, "batch": 4, "lr": 1e-3},
    "text": {"steps": 3, "batch": 16, "lr": 1e-3},
    "unet": {"steps": 3, "batch": 4, "lr": 1e-3},
    "lcm": {"steps": 3, "batch": 4, "lr": 1e-4},
}


def settings(stage: str, **kw):
    return stage_settings(stage, **{**TINY[stage], "warmup": 0, **kw})


def run_stage(run: str, stage: str, max_seconds=None, **kw) -> dict:
    return TRAIN[stage](run, settings(stage, **kw), max_seconds=max_seconds, log=lambda _: None)


def finished_tiny_run(folder: str) -> list[dict]:
    """Run every stage of a new tiny run in `folder`; returns each stage's result."""
    init_run(folder, "tiny")
    return [run_stage(folder, stage) for stage in TRAIN]
