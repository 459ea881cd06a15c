"""The embedded ControlNet's adherence: on fresh control masks (the dataset's exact geometry), IoU of the generated
shapes' mask with the control mask and the judge's adherence to the prompt, with and without the ControlNet (same
prompts and noise); LCM 4 steps at guidance 8.5, the CLI's defaults (diffrt.train.controlnet.evaluate_controlnet).

    python benchmarks/control_adherence.py --controlnet runtime/default_controlnet \
        --json benchmarks/results/control_adherence.json --grid benchmarks/results/control_adherence.png
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.environment import environment
from benchmarks.results_file import write_json
from diffrt.train.controlnet import DEFAULT_MODEL, evaluate_controlnet


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--controlnet", required=True, help="the ControlNet folder (diffrt train controlnet's model)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--held-out-share", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cfg", type=float, default=8.5)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--commit", default=None)
    p.add_argument("--json", default="control_adherence.json")
    p.add_argument("--grid", default="control_adherence.png")
    args = p.parse_args(argv)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    report = evaluate_controlnet(args.model, args.controlnet, args.count, args.held_out_share, args.steps, args.cfg,
                                 args.device, dtype, args.batch)  # fmt: skip
    grid = report.pop("grid")
    report["environment"] = {**environment(args.commit), "device": args.device, "dtype": str(dtype)}
    report["controlnet_path"] = os.path.abspath(args.controlnet)
    for path in (args.json, args.grid):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(args.json, report, indent=2)
    grid.save(args.grid)
    for name in ("controlnet", "none"):
        r = report[name]
        print(
            f"{name:10s} IoU {r['iou_mean']:.3f} (>= 0.8: {r['iou_at_least_0.8']:.2f}) adherence {r['adherence']:.3f}"
        )
    return report


if __name__ == "__main__":
    main()
