"""The VAE decoder in fp32, bf16 and fp16: error against the fp32 decode and time as a graph replay, per size.

The SDXL VAE overflows in fp16 (its trained activations exceed 65504), so it runs in fp32 under an fp16 pipeline
today, which costs most of an SDXL 1024² generation. bf16 has fp32's exponent range; this measures what its 8-bit
mantissa costs in the image (max abs error in 0..1, PSNR, NaN) and what it saves in time, on the fast path's kernels
(diffrt's Triton GroupNorm, channels-last). Random weights: the error is the rounding of the arithmetic, not an
overflow (a trained SDXL VAE's fp16 overflow does not show on random weights; the fp16 column is for comparison).

    python benchmarks/vae_precision.py --archs sdxl,sd21 --sizes 512,1024 --out results/vae_precision_h200.json
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment  # noqa: E402
from benchmarks.results_file import write_json  # noqa: E402
from diffrt import latency  # noqa: E402
from diffrt.backends.torch_roles import TorchImageCodec  # noqa: E402
from diffrt.pipeline import Pipeline  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="sdxl,sd21")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows, env = [], environment(args.commit)
    for arch in args.archs.split(","):
        pipe = Pipeline.from_pretrained(arch, device="cuda", dtype=torch.float16, backend="cuda-graph",
                                        vae_dtype=torch.float32)  # fmt: skip
        vaes = {name: copy.deepcopy(pipe.components.vae).to(dt) for name, dt in DTYPES.items()}
        codecs = {name: TorchImageCodec(vae, torch.float16) for name, vae in vaes.items()}
        for size in (int(s) for s in args.sizes.split(",")):
            g = torch.Generator("cuda").manual_seed(size)
            shape = (1, pipe.spec.latent_channels, size // pipe.spec.vae_scale, size // pipe.spec.vae_scale)
            latents = torch.randn(shape, generator=g, device="cuda").half()  # scaled latents: unit variance
            with torch.inference_mode():
                reference = codecs["fp32"].decode(latents).float()
                for name, codec in codecs.items():
                    images = codec.decode(latents).float()
                    timing = latency.graph_replay_ms(lambda c=codec, z=latents: c.decode(z))
                    row = {**env, "arch": arch, "size": size, "vae_dtype": name, **timing,
                           "max_abs": (images - reference).abs().max().item(), "psnr_db": psnr(images, reference),
                           "nan": bool(torch.isnan(images).any().item())}  # fmt: skip
                    rows.append(row)
                    print(f"{arch} {size}² {name}: {row['median_ms']:.2f} ms, max abs {row['max_abs']:.2e}, "
                          f"PSNR {row['psnr_db']:.1f} dB, nan {row['nan']}", flush=True)  # fmt: skip
        del pipe, vaes, codecs
        torch.cuda.empty_cache()
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
