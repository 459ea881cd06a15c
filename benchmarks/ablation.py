"""Issue 11's ablation: the UNet step and the VAE decode as CUDA-graph replays with each optimization of the fast
path switched off in turn, so each one's share of the time shows, on one pipeline in one process.

Variants (diffrt.models.ops records built from TRITON_OPS with one entry put back on torch's implementation):
  diffrt                    everything on: the Triton kernels, folded biases, channels-last (the fast path)
  - folded biases           each convolution adds its bias itself (torch's bias add after cuDNN)
  - GEGLU kernel            GEGLU's gate as torch's GELU and product
  - upsample kernel         torch's nearest upsampling
  - wide-head attention     the VAE's 512-wide head on torch's SDPA (its memory-efficient kernel)
  - attention kernel        every attention on torch's SDPA (cuDNN / flash / memory-efficient, torch's choice)
  - GroupNorm kernel        torch's GroupNorm + SiLU
  - channels-last           the kernels on NCHW tensors
  torch ops                 TORCH_OPS in NCHW: the graph replay of diffrt's reference modules
  - fused projections       attention's q/k/v (cross: k/v) as separate GEMMs, as diffusers runs them
  - TAESD epilogues         TAESD's bias, ReLU and residual on torch's passes and its upsampling on torch's kernel
                            (TAESD's decode and encode are timed beside the KL VAE's)
  - fused residuals         the transformer blocks' residual adds as kernels of their own after torch's LayerNorm,
                            instead of in the output projections' GEMMs (diffrt.kernels.layer_norm)
  - GroupNorm statistics    each GroupNorm takes its own statistics, instead of the ResNet block's residual add
                            taking them for the GroupNorm after it (ops.group_stats)
  - text encoder residuals  the CLIP layers' residual adds as kernels of their own, instead of in their GEMMs as the
                            UNet's (ops.fuse_text_residuals; the text encoder(s) are timed beside the UNet and VAEs)
  + GEGLU in its GEMM       off on the fast path (slower on the H200): GEGLU's projection and gate in one Triton GEMM
                            instead of cuBLAS's projection and the gate kernel (ops.geglu_linear)
  - upsampling in its convolution
                            nearest 2x upsampling, then the 3x3 convolution at twice the resolution, instead of four
                            2x2 phase convolutions at the input's (ops.upsample_conv)
  - time projections in one GEMM
                            the UNet's time-embedding projections one block at a time, each a SiLU and a GEMV,
                            instead of one SiLU and one GEMM over all blocks (ops.joint_time_projections)
  - cross-attention K/V once
                            every cross-attention layer's keys and values of the text per layer and step, instead of
                            in one GEMM once per generation (ops.joint_cross_attention); its share shows end to end
                            (--runs)
  - text encoders side by side
                            SDXL's two text encoders one after the other, instead of the first on a side stream
                            (ops.concurrent_text_encoders)
  + half2 / split / poly exponentials
                            the attention kernel's softmax exponentials two fp16 ones per instruction, half of each
                            tile / all of it as a polynomial on the FMA units (kernels/attention.py EXP2_MODES);
                            "... and long self-attention": also the self-attention the fast path sends to SDPA
  + block biases in joint passes
                            the ResNet blocks' bias sums (time projection + conv1's bias, conv2's + the shortcut's)
                            as one add each for all blocks of a step (ops.joint_block_biases)
  + transformer residual in its GEMM
                            each Transformer2D's GroupNorm also writes x + proj_out's bias, proj_out's GEMM adds
                            into it: no add kernel for the outer residual (ops.group_norm_plus)
  + programmatic dependent launch
                            every Triton kernel launched to start while its predecessor finishes, waiting in-kernel
                            for its memory (kernels/grid_dependency.py): the same ops, other launches

With --runs (e.g. "1 step,LCM 4 steps"), each variant also times those generations end to end (the pipeline's graphs
captured again on the variant's ops), for what only a whole generation shows.

    python benchmarks/ablation.py --archs sd21 --sizes 512,1024 --out benchmarks/results/ablation_h200.json
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment  # noqa: E402
from benchmarks.latency import Results  # noqa: E402
from diffrt import latency  # noqa: E402
from diffrt.kernels import grid_dependency  # noqa: E402
from diffrt.models import ops  # noqa: E402
from diffrt.models.taesd import AutoencoderTiny, TAESDConfig  # noqa: E402
from diffrt.pipeline import Pipeline  # noqa: E402
from diffrt.request import GenerationRequest  # noqa: E402


def _narrow_heads_only(q, k, v):
    """The kernels' attention, with wide heads sent back to torch's SDPA."""
    return ops.attention_torch(q, k, v) if q.shape[-1] > 256 else ops.attention_triton(q, k, v)


def _wide_heads_on_torch_softmax(q, k, v):
    """The kernels' attention, with the wide heads' softmax torch's (fp32 probabilities, then a cast to half)."""
    return ops.attention_wide_heads(q, k, v) if q.shape[-1] > 256 else ops.attention_triton(q, k, v)


def _with_exponentials(mode: str, attention: str):
    """ops.<attention> with the attention kernel's exponentials in `mode`: a constexpr of the kernel, so the
    variant's captured graphs keep it after the call returns."""

    def run(q, k, v):
        from diffrt.kernels import attention as kernel

        previous, kernel.EXP2 = kernel.EXP2, mode
        try:
            return getattr(ops, attention)(q, k, v)
        finally:
            kernel.EXP2 = previous

    return run


T = ops.TRITON_OPS
# name -> (ops, channels_last)
VARIANTS = {
    "diffrt": (T, True),
    "- folded biases": (
        dataclasses.replace(T, fold_bias=False, conv2d=torch.nn.functional.conv2d, bias_add=ops.bias_add_torch),
        True,
    ),
    "- GEGLU kernel": (dataclasses.replace(T, geglu=ops.geglu_torch), True),
    "- upsample kernel": (dataclasses.replace(T, upsample_nearest=ops.upsample_nearest_torch), True),
    "- wide-head attention": (dataclasses.replace(T, attention=_narrow_heads_only), True),
    "- attention kernel": (dataclasses.replace(T, attention=ops.attention_torch), True),
    "- GroupNorm kernel": (dataclasses.replace(T, group_norm=ops.group_norm_torch), True),
    "- channels-last": (T, False),
    "torch ops": (ops.TORCH_OPS, False),
    "- fused projections": (dataclasses.replace(T, fuse_projections=False), True),
    "- TAESD epilogues": (dataclasses.replace(T, taesd_epilogues=False), True),
    "- fused residuals": (dataclasses.replace(T, fuse_residuals=False), True),
    "- GroupNorm statistics": (dataclasses.replace(T, group_stats=False), True),
    "- text encoder residuals": (dataclasses.replace(T, fuse_text_residuals=False), True),
    "+ GEGLU in its GEMM": (dataclasses.replace(T, geglu_linear=ops.geglu_linear_triton), True),
    "- upsampling in its convolution": (dataclasses.replace(T, upsample_conv=None), True),
    "- time projections in one GEMM": (dataclasses.replace(T, joint_time_projections=False), True),
    "- SDPA for long self-attention": (dataclasses.replace(T, attention=ops.attention_kernels), True),
    "- wide-head softmax in one pass": (dataclasses.replace(T, attention=_wide_heads_on_torch_softmax), True),
    "- cross-attention K/V once": (dataclasses.replace(T, joint_cross_attention=False), True),
    "- text encoders side by side": (dataclasses.replace(T, concurrent_text_encoders=False), True),
    **{
        f"+ {mode} exponentials{long}": (dataclasses.replace(T, attention=_with_exponentials(mode, fn)), True)
        for mode in ("half2", "split", "poly")
        for long, fn in (("", "attention_triton"), (" and long self-attention", "attention_kernels"))
    },
    "+ programmatic dependent launch": (T, True),
    "+ block biases in joint passes": (dataclasses.replace(T, joint_block_biases=True), True),
    "+ transformer residual in its GEMM": (dataclasses.replace(T, group_norm_plus=ops.group_norm_plus_triton), True),
}
# Variants that change how the kernels are launched rather than which ops run: their timings (and graph captures)
# run inside this context.
LAUNCHES = {"+ programmatic dependent launch": grid_dependency.enabled}


def launches(name: str) -> contextlib.AbstractContextManager:
    """The launch context a variant's calls run in (none for the ops variants)."""
    return LAUNCHES.get(name, contextlib.nullcontext)()


def measure(
    res: Results, arch: str, sizes: list[int], variants: list[str], deadline: float, runs: list[str] = ()
) -> None:
    pipe = Pipeline.from_pretrained(arch, device="cuda", dtype=torch.float16, backend="cuda-graph")
    unet, vae = pipe.components.unet, pipe.components.vae
    c = pipe.components
    text_encoders = [m for m in (c.text_encoder, c.text_encoder_2) if m is not None]
    encoder = pipe.roles.text_encoder.encoder  # the graphed role's inner one: graph_replay_ms captures it itself
    tokenizer, tokenizer_2 = pipe.tokenizers
    ids = tokenizer([latency.PROMPT]).cuda() if tokenizer is not None else None
    ids_2 = tokenizer_2([latency.PROMPT]).cuda() if tokenizer_2 is not None else None
    taesd = AutoencoderTiny(TAESDConfig.preset("taesdxl" if pipe.spec.sdxl else "taesd")).eval()
    taesd.to("cuda", torch.float16).to(memory_format=torch.channels_last).requires_grad_(False)
    for size in sizes:
        request = GenerationRequest(
            latency.PROMPT, height=size, width=size, steps=1, guidance_scale=1.0, output_type="pt"
        )
        plan = pipe.plan(pipe.resolve(request))
        calls = {  # what -> the call timed
            "text_encoder": functools.partial(encoder, ids, ids_2),
            "unet_step": functools.partial(
                pipe.roles.denoiser, plan.latents, torch.tensor(999.0, device="cuda"), plan.cond
            ),  # fmt: skip
            "decode": functools.partial(pipe.roles.codec.decode, plan.latents),
            "decode taesd": functools.partial(taesd.decode, plan.latents),
            "encode taesd": functools.partial(taesd.encode, torch.zeros(1, 3, size, size, device="cuda").half()
                                              .to(memory_format=torch.channels_last)),
        }  # fmt: skip
        for name in variants:
            cell = {"arch": arch, "impl": name, "batch": 1, "height": size, "width": size}
            if time.time() > deadline:
                return
            if all(res.has(**cell, what=what) for what in [*calls, *(f"e2e {run}" for run in runs)]):
                continue
            variant, channels_last = VARIANTS[name]
            layout = torch.channels_last if channels_last else torch.contiguous_format
            for module in (unet, vae, taesd):
                ops.set_ops(module, variant).to(memory_format=layout)
            for module in text_encoders:
                ops.set_ops(module, variant)
            with torch.inference_mode(), launches(name):
                for what, call in calls.items():
                    if not res.has(**cell, what=what):
                        res.add(**cell, what=what, **latency.graph_replay_ms(call))
            if runs:  # the pipeline's own graphs were captured on the previous variant's kernels
                pipe.backend.clear()
                pipe.roles.text_encoder.clear()
            for run in runs:
                if not res.has(**cell, what=f"e2e {run}"):
                    sampler, steps, guidance = latency.RUNS[run]
                    request = GenerationRequest(latency.PROMPT, height=size, width=size, sampler=sampler, steps=steps,
                                                guidance_scale=guidance)  # fmt: skip
                    with launches(name):
                        res.add(**cell, what=f"e2e {run}", steps=steps, **latency.end_to_end(pipe, request))
    for module in (unet, vae, taesd):  # back to the fast path's own choice
        ops.set_ops(module, T).to(memory_format=torch.channels_last)
    for module in text_encoders:
        ops.set_ops(module, T)
    if runs:
        pipe.backend.clear()
        pipe.roles.text_encoder.clear()


def report(path: str) -> None:
    """A markdown table: per component and size, each variant's time and how much switching it off costs."""
    rows = json.loads(Path(path).read_text())["rows"]
    by = {(r["arch"], r["what"], r["height"], r["impl"]): r["median_ms"] for r in rows}
    lines = ["| arch | component | size | variant | ms | vs all on |", "|---|---|---|---|---|---|"]
    for arch, what, size in sorted({(r["arch"], r["what"], r["height"]) for r in rows}):
        base = by.get((arch, what, size, "diffrt"))
        for name in VARIANTS:
            ms = by.get((arch, what, size, name))
            if ms is not None:
                delta = f"{ms - base:+.3f} ms ({100 * (ms - base) / base:+.1f}%)" if base and name != "diffrt" else ""
                lines.append(f"| {arch} | {what} | {size}² | {name} | {ms:.3f} | {delta} |")
    env = rows[0] if rows else {}
    head = f"{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}\n\n"
    Path(path).with_suffix(".md").write_text(head + "\n".join(lines) + "\n")
    print(Path(path).with_suffix(".md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="sd21")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="", help='generations timed end to end per variant, e.g. "LCM 4 steps"')
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    res = Results(args.out, environment(args.commit))
    for arch in args.archs.split(","):
        runs = [run for run in args.runs.split(",") if run]
        measure(res, arch, [int(s) for s in args.sizes.split(",")], args.variants.split(","), deadline, runs)
    report(args.out)


if __name__ == "__main__":
    main()
