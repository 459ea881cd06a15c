"""benchmarks/launch_gaps.py's chains: each link reads the one before it, and the GEMM between the LayerNorms (an
identity) leaves their values as they are, so both chains time the same LayerNorm work."""

import torch

from benchmarks.launch_gaps import CHAINS, chain
from diffrt.kernels.layer_norm import layer_norm_reference


def test_both_chains_compute_repeated_layer_norms():
    torch.manual_seed(0)
    x = torch.randn(8, 32, dtype=torch.float16) * 3 + 1
    w, b = torch.rand(32, dtype=torch.float16) + 0.5, torch.randn(32, dtype=torch.float16)
    want = x
    for _ in range(3):
        want = layer_norm_reference(want.float(), w.float(), b.float()).half()
    for kind in CHAINS:
        got = chain(kind, x, w, b, torch.eye(32, dtype=torch.float16), 3)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1e-2)
