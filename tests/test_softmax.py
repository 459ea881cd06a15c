"""kernels/softmax.py against torch's fp32 softmax and its cast: labelled edge rows on the CPU (Triton interpreter),
both of its paths (a row held whole, and two passes over a long row), and the VAE's real score shapes on the GPU."""

import pytest
import torch

from diffrt.kernels import softmax as softmax_mod
from diffrt.kernels.softmax import softmax_rows, softmax_rows_reference
from diffrt.models import ops
from tests.helpers.kernel_checks import DTYPES, TOLERANCES, check_output, device, poisoned_like

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _check(shape, dtype, atol, rtol, what, spread=8.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(shape, generator=g) * spread).to(device())  # peaked rows: large exponents either way
    out = poisoned_like(torch.empty(shape, dtype=dtype, device=device()))
    y = softmax_rows(scores, dtype, out=out)
    assert y is out
    ref = scores.double().softmax(-1)
    err = check_output(y, ref, softmax_rows_reference(scores, dtype), atol, rtol, what)
    sums = y.double().sum(-1)
    assert (sums - 1).abs().max().item() <= 2 * rtol, f"{what}: rows sum to {sums.min():.4f}..{sums.max():.4f}"
    return err


# (label, shape): one key, a row shorter than any tile, the text's 77 keys, not a power of two, 3-D batches of rows.
EDGE_SHAPES = [
    ("one_key", (3, 1)),
    ("keys5", (4, 5)),
    ("keys77", (2, 7, 77)),
    ("keys1000", (3, 1000)),
    ("batch2_rows9_keys64", (2, 9, 64)),
]


@pytest.mark.parametrize("label,shape", EDGE_SHAPES, ids=[s[0] for s in EDGE_SHAPES])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_edge_shapes(label, shape, dtype, atol, rtol):
    _check(shape, dtype, atol, rtol, f"{label} {dtype}")


@pytest.mark.parametrize("keys", [17, 64, 1000], ids=lambda n: f"keys{n}")
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_long_rows_take_two_passes(keys, dtype, atol, rtol, monkeypatch):
    """Rows longer than one program holds (65536 keys in the 2048² decode), here shrunk to 16 columns a pass."""
    monkeypatch.setattr(softmax_mod, "SINGLE_PASS_MAX_COLUMNS", 8)
    monkeypatch.setattr(softmax_mod, "LOOP_BLOCK", 16)
    _check((5, keys), dtype, atol, rtol, f"two passes, {keys} keys {dtype}")


def test_a_row_of_one_large_score_is_one_hot():
    scores = torch.full((2, 300), -1e4, device=device())
    scores[0, 7] = scores[1, 299] = 50.0
    y = softmax_rows(scores, torch.float16).float()
    assert y[0, 7] == 1 and y[1, 299] == 1 and y.sum().item() == 2


def test_rejects_what_it_does_not_take():
    with pytest.raises(ValueError, match="float32"):
        softmax_rows(torch.randn(4, 8, device=device()).half(), torch.float16)
    with pytest.raises(ValueError, match="contiguous"):
        softmax_rows(torch.randn(8, 4, device=device()).t(), torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        softmax_rows(torch.randn(4, 8, device=device()), torch.int8)


@pytest.mark.parametrize("score_bytes", [None, 4096], ids=["one_chunk", "query_chunks"])
def test_the_wide_head_attention_on_it_matches_the_torch_softmax(score_bytes, monkeypatch):
    """ops.attention_triton's wide heads: the VAE's 512-wide head (320 here) with this kernel's softmax, as close to
    fp32 as the path with torch's softmax and cast, and the kernel seen to run."""
    if score_bytes is not None:
        monkeypatch.setattr(ops, "WIDE_HEAD_SCORE_BYTES", score_bytes)  # 16 query rows per chunk of 64 keys
    calls = []
    monkeypatch.setattr(softmax_mod, "softmax_rows", lambda s, dt: calls.append(s.shape) or softmax_rows(s, dt))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, n, 320, generator=g).to(device()) for n in (70, 64, 64))
    ref = ops.attention_torch(q.double(), k.double(), v.double())
    ours = ops.attention_triton(q.half(), k.half(), v.half()).double()
    torch_path = ops.attention_wide_heads(q.half(), k.half(), v.half()).double()
    assert calls and all(s[-1] == 64 for s in calls)
    err, torch_err = ((x - ref).abs().max().item() for x in (ours, torch_path))
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)


# The SD VAE decoder's attention scores per chunk (ops.WIDE_HEAD_SCORE_BYTES): 512² (4096 keys), 1024² (16384), 2048²
# (65536: the two-pass path).
REAL_SHAPES = [(1, 4096, 4096), (1, 4096, 16384), (1, 1024, 65536)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_real_shapes(shape, dtype):
    _check(shape, dtype, *TOLERANCES[dtype], f"{shape} {dtype}", spread=3.0)
