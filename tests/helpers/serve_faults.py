"""`diffrt serve` with a fault-injecting pipeline, for the tests of what the server does when things go wrong:

    python -m tests.helpers.serve_faults [--step-delay S] [--oom-marker WORD] [--memory-budget-mb M] -- SERVE ARGS

--step-delay sleeps after each denoising step (a slow GPU: queues fill, timeouts and disconnects land mid-run);
--oom-marker raises torch.OutOfMemoryError at the first step of a request whose prompt contains WORD, as a CUDA
allocation would; --memory-budget-mb sets the budget the limits are derived from, as a small GPU would.
"""

import argparse
import sys
import time
from dataclasses import replace

import torch

from diffrt.cli import build_parser
from diffrt.serve.cli import config_of, serve_http
from diffrt.serve.worker import OUT_OF_MEMORY


class FaultInjectingPipeline:
    """The real pipeline, with faults added in its step callback; everything else passes through."""

    def __init__(self, pipeline, step_delay_s: float, oom_marker: str | None) -> None:
        self._pipeline, self.step_delay_s, self.oom_marker = pipeline, step_delay_s, oom_marker

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def generate(self, request, *, generator=None, callback=None):
        def step(i, latents, denoised):
            if self.oom_marker and any(self.oom_marker in p for p in request.prompts):
                raise OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")
            time.sleep(self.step_delay_s)
            if callback is not None:
                callback(i, latents, denoised)

        return self._pipeline.generate(request, generator=generator, callback=step)


def main(argv: list[str]) -> int:
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--oom-marker", default=None)
    p.add_argument("--memory-budget-mb", type=float, default=None)
    faults = p.parse_args(argv[:split])
    args = build_parser().parse_args(["serve", *argv[split + 1 :]])
    config = config_of(args)
    if faults.memory_budget_mb is not None:
        config = replace(config, memory_budget=int(faults.memory_budget_mb * 2**20))
    torch.set_num_threads(1)  # two servers and the test process share a 2-core CI machine
    return serve_http(config, host=args.host, port=args.port, log_level=args.log_level,
                      wrap=lambda pipe: FaultInjectingPipeline(pipe, faults.step_delay, faults.oom_marker))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
