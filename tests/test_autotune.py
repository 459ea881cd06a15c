"""The autotuning policy's timing (kernels/_autotune.py): Triton's do_bench_cudagraph times on a stream of its own
that does not wait for the caller's, so a shape's first call, which tunes right after its input's producer was
launched, must wait for that producer before the timed runs read (and for kernels in place, clone and restore) it."""

import pytest
import torch

from diffrt.kernels import _autotune


@pytest.mark.parametrize("capturing,expected", [(False, ["synchronize", "time"]), (True, ["time"])],
                         ids=["eager", "capturing"])  # fmt: skip
def test_the_caller_s_work_is_waited_for_before_timing(monkeypatch, capturing, expected):
    """While a stream captures, a device-wide synchronize is an error; the timing itself then fails as it did."""
    order = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: order.append("synchronize"))
    monkeypatch.setattr(_autotune.triton.testing, "do_bench_cudagraph", lambda fn, **kw: order.append("time") or 1.0)
    assert _autotune._short_bench(lambda: None, (0.5,)) == 1.0
    assert order == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_the_timed_runs_see_the_caller_s_pending_writes():
    x = torch.zeros(1024, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # tens of milliseconds of spinning on the caller's stream...
    x.fill_(1.0)  # ...before its producer writes x
    seen = []
    _autotune._short_bench(lambda: seen.append(x.clone()), (0.5, 0.2, 0.8))
    torch.cuda.synchronize()
    assert bool((seen[0] == 1.0).all()), "the first timed run read x before the caller's stream had written it"
