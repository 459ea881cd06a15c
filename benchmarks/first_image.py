"""Time to first image in a fresh process: weights (reported apart), then the first generation (kernel compilation,
autotuning and graph capture included), the second (the steady state), and a first generation at a new size.

Run it twice with the same --cache-dir: the first run finds it empty (cold: nothing on disk), the second finds the
Triton kernels and autotuning choices the first one cached (warm).

    python benchmarks/first_image.py --arch sd21 --size 512 --new-size 768 --cache-dir /tmp/dc --out cold.json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

t_start = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd21")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--new-size", type=int, default=768)
    ap.add_argument("--cache-dir", required=True, help="Triton's cache (kernels and autotuning results)")
    ap.add_argument("--backend", default="cuda-graph")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cold = not (os.path.isdir(args.cache_dir) and os.listdir(args.cache_dir))
    os.environ["TRITON_CACHE_DIR"] = args.cache_dir  # before Triton is imported

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels
    import torch

    from benchmarks.environment import environment
    from benchmarks.results_file import write_json
    from diffrt import latency
    from diffrt.pipeline import Pipeline
    from diffrt.request import GenerationRequest

    t_import = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.arch, device="cuda", dtype=torch.float16, backend=args.backend)
    torch.cuda.synchronize()
    t_loaded = time.perf_counter()

    def generate(size: int) -> float:
        request = GenerationRequest(latency.PROMPT, height=size, width=size, sampler="turbo", steps=1,
                                    guidance_scale=0.0, output_type="pt")  # fmt: skip
        t0 = time.perf_counter()
        pipe.generate(request)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = generate(args.size)
    second = generate(args.size)
    new_size = generate(args.new_size)
    row = {
        **environment(args.commit),
        "arch": args.arch,
        "backend": pipe.backend.name,
        "disk_cache": "cold (empty)" if cold else "warm (present)",
        "size": args.size,
        "import_s": t_import - t_start,
        "weights_s": t_loaded - t_import,  # random weights drawn on the GPU: loading is reported, not counted
        "first_image_s": first,
        "second_image_s": second,
        "new_size": args.new_size,
        "new_size_first_image_s": new_size,
    }
    write_json(args.out, row)
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
