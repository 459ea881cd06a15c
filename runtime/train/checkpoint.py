"""Resumable training: atomic safetensors checkpoints plus a JSON state, and the loop every trainer runs.

A stage folder holds `state.json` (step, settings, optimizer hyperparameters, the checkpoint's file name) and one
`ckpt-STEP.safetensors` (every module's state_dict under `MODULE.` and the optimizer's tensors under `optimizer.`).
Both are written to a temporary file and renamed, the checkpoint first: a run killed at any point leaves the
previous consistent pair. Every step is a pure function of (seed, step): its batch comes from the dataset seeds of
that step and its noise from a generator seeded with (seed, step), and the learning rate is a function of the step,
so a resumed run repeats exactly what an uninterrupted one would have done.
"""

import json
import os
import tempfile
import time
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffrt.export.files import write_atomically

STATE = "state.json"


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_json(obj, path: str) -> None:
    write_atomically(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_state(folder: str) -> dict | None:
    path = os.path.join(folder, STATE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def autocast(device, precision: str):
    """bf16 autocast for "bf16" (the GPU default), nothing for "fp32"."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def step_generator(seed: int, step: int, device="cpu", stream: int = 0) -> torch.Generator:
    """The generator of one training step: its noise, timesteps and dropout depend on (seed, step) only; `stream`
    gives the same step further independent streams (e.g. host-side draws beside the device's)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step + stream * 10**12)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: str, step: int, modules: dict[str, nn.Module], opt, info: dict) -> None:
    """Write the checkpoint, then the state that names it, then remove older checkpoints."""
    os.makedirs(folder, exist_ok=True)
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    name = f"ckpt-{step:08d}.safetensors"
    atomic_save_file({**tensors, **opt_tensors}, os.path.join(folder, name))
    atomic_write_json({**info, "step": step, "checkpoint": name, "optimizer": opt_meta}, os.path.join(folder, STATE))
    for old in os.listdir(folder):
        if old.startswith("ckpt-") and old.endswith(".safetensors") and old != name:
            os.unlink(os.path.join(folder, old))


def load_modules(folder: str, modules: dict[str, nn.Module], opt=None) -> dict:
    """Load the latest checkpoint of a stage into `modules` (and `opt`); returns its state."""
    state = read_state(folder)
    if state is None:
        raise ValueError(f"{folder} holds no {STATE}; train that stage first")
    tensors = load_file(os.path.join(folder, state["checkpoint"]))
    for name, module in modules.items():
        prefix = f"{name}."
        sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sd)
    if opt is not None:
        _load_optimizer(opt, tensors, state["optimizer"])
    return state


def finished_stage(run: str, stage: str) -> str:
    """The folder of an upstream stage, which must have run all its steps."""
    folder = os.path.join(run, stage)
    state = read_state(folder)
    if state is None or state["step"] < state["settings"]["steps"]:
        have = "no checkpoint" if state is None else f"step {state['step']} of {state['settings']['steps']}"
        raise ValueError(f"stage {stage!r} of run {run} is not finished ({have}); run `diffrt train {stage} {run}`")
    return folder


def lr_factor(step: int, warmup: int) -> float:
    """Linear warm-up, then constant (the schedule of SD's and LCM's training scripts)."""
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def run_loop(
    folder: str,
    settings: dict,
    modules: dict[str, nn.Module],
    opt: torch.optim.Optimizer,
    step_fn: Callable[[int], dict[str, float]],
    *,
    save_every: int,
    max_seconds: float | None = None,
    log: Callable[[str], None] = print,
    log_every: int = 50,
) -> dict:
    """Resume from `folder` if it holds a state (whose settings must equal `settings`, except `steps`: the
    learning rate is constant after warm-up, so training longer continues the same run, and --steps equal to the
    step reached ends the stage there), then call step_fn(step)
    up to settings["steps"], saving every `save_every` steps, at the end, and when `max_seconds` have passed.
    Returns {"step", "done", "history": [(step, metrics)], "seconds_per_step"}."""
    state = read_state(folder)
    start = 0
    if state is not None:
        saved, now = state["settings"], json.loads(json.dumps(settings))
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v and k != "steps"}
        if diff:
            raise ValueError(
                f"{folder} was started with other settings (saved, now): {diff}; resume with the same settings or "
                "use another run folder"
            )
        load_modules(folder, modules, opt)
        start = state["step"]
        log(f"resuming {folder} at step {start}")
    steps, t0, history, step = settings["steps"], time.time(), [], start
    info = {"settings": settings}
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, settings.get("warmup", 0))
        metrics = step_fn(step)  # tensors are read only when logged: a read per step would sync the GPU each step
        history.append((step, metrics))
        step += 1
        if step % log_every == 0 or step == steps:
            text = " ".join(f"{k} {float(v):.5f}" for k, v in metrics.items())
            log(f"step {step}/{steps} {text} ({(time.time() - t0) / (step - start):.3f} s/step)")
        out_of_time = max_seconds is not None and time.time() - t0 > max_seconds
        if step % save_every == 0 or step == steps or out_of_time:
            save_checkpoint(folder, step, modules, opt, info)
            if out_of_time and step < steps:
                log(f"time budget reached: saved step {step}; run the same command again to continue")
                break
    if state is not None and step == start and state["settings"]["steps"] != steps:
        save_checkpoint(folder, step, modules, opt, info)  # a shorter --steps ends the stage here: record it as done
    seconds = (time.time() - t0) / max(step - start, 1)
    history = [(i, {k: float(v) for k, v in m.items()}) for i, m in history]
    return {"step": step, "done": step >= steps, "history": history, "seconds_per_step": seconds}


def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source for parameters and float buffers (one fused foreach call, as
    timm's ModelEmaV3: a per-tensor loop costs hundreds of kernel launches a step); integer buffers are copied."""
    with torch.no_grad():
        pairs = list(zip(target.state_dict().values(), source.state_dict().values(), strict=True))
        floats = [(t, s) for t, s in pairs if t.is_floating_point()]
        if floats:
            torch._foreach_lerp_([t for t, _ in floats], [s.to(t.dtype) for t, s in floats], 1.0 - decay)
        for t, s in pairs:
            if not t.is_floating_point():
                t.copy_(s)


def adamw(groups: list[dict], device, weight_decay: float = 1e-2) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on CUDA (the foreach version launches several per parameter group)."""
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=torch.device(device).type == "cuda")


def param_groups(*groups: tuple[list[nn.Parameter], float]) -> list[dict]:
    """Optimizer groups with a `base_lr` that run_loop scales by the warm-up factor each step."""
    return [{"params": params, "lr": lr, "base_lr": lr} for params, lr in groups if lr > 0 and params]
