"""Programmatic dependent launch (kernels/grid_dependency.py): every Triton kernel waits for its predecessor before
it touches memory and every launch passes the same switch to the kernel and to Triton (checked in the source, since
a kernel launched early without the wait would read its input before it is written), the switch is off under the
interpreter and restored after its block; on the GPU (`-m gpu`) a chain of kernels replayed from a CUDA graph with
it on gives the bits it gives without, for fresh inputs copied in before each replay, and so does the CUDA-graph
pipeline."""

import ast
from pathlib import Path

import pytest
import torch

from diffrt.kernels import grid_dependency

KERNELS = sorted((Path(__file__).resolve().parents[1] / "kernels").glob("*.py"))
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _jit_kernels(tree: ast.Module) -> list[ast.FunctionDef]:
    return [
        f
        for f in tree.body
        if isinstance(f, ast.FunctionDef)
        and f.name.endswith("_kernel")
        and any(ast.unparse(d) == "triton.jit" for d in f.decorator_list)
    ]


def _body_without_docstring(f: ast.FunctionDef) -> list[ast.stmt]:
    body = f.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return body


def test_every_kernel_waits_for_its_predecessor_first():
    kernels = {path.stem: _jit_kernels(ast.parse(path.read_text())) for path in KERNELS}
    assert sum(map(len, kernels.values())) >= 12  # the files were found and parsed
    for stem, functions in kernels.items():
        for f in functions:
            assert f.args.args[-1].arg == "PDL", f"{stem}.{f.name}: PDL is not its last argument"
            first = ast.unparse(_body_without_docstring(f)[0])
            assert first == "wait_for_predecessor(PDL)", f"{stem}.{f.name} starts with {first!r}"


def test_every_launch_passes_the_launch_options():
    launches = 0
    for path in KERNELS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):  # kernel[grid](...)
                launches += 1
                spread = [ast.unparse(k.value) for k in node.keywords if k.arg is None]
                assert any(s.startswith("launch_options(") for s in spread), f"{path.name}: {ast.unparse(node)}"
    assert launches >= 12


def test_the_switch_is_off_by_default_and_restored_after_its_block():
    cpu = torch.device("cpu")
    assert not grid_dependency.ENABLED
    assert grid_dependency.launch_options(cpu) == {"PDL": False, "launch_pdl": False}
    with grid_dependency.enabled():
        assert grid_dependency.ENABLED
        assert grid_dependency.launch_options(cpu) == {"PDL": False, "launch_pdl": False}  # no CUDA, no PDL
    assert not grid_dependency.ENABLED
    with pytest.raises(RuntimeError), grid_dependency.enabled():
        raise RuntimeError
    assert not grid_dependency.ENABLED


def _chain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    """Each kernel reads what the one before it wrote: GroupNorm's three split kernels, the upsampler, the fused
    GroupNorm, LayerNorm, attention, the row softmax, GEGLU."""
    from diffrt.kernels.attention import attention
    from diffrt.kernels.geglu import geglu
    from diffrt.kernels.group_norm import group_norm
    from diffrt.kernels.layer_norm import layer_norm
    from diffrt.kernels.softmax import softmax_rows
    from diffrt.kernels.upsample import upsample_nearest2x

    h = group_norm(x, 32, w, b, silu=True, algorithm="split")
    up = upsample_nearest2x(h)
    g = group_norm(up, 32, w, b, algorithm="fused")
    tokens = g.permute(0, 2, 3, 1).reshape(1, -1, g.shape[1])
    n = layer_norm(tokens, w, b)
    q = n.view(1, -1, 5, 64)
    a = attention(q, q, q)
    s = softmax_rows(a.view(-1, 320)[:256].float(), torch.float16)
    return [h, up, g, n, a, s, geglu(a.view(-1, 320))]


@pytest.mark.gpu
@gpu
def test_a_chain_of_kernels_replayed_with_pdl_gives_the_bits_of_one_without():
    torch.manual_seed(0)
    device = torch.device("cuda")
    x = torch.randn(1, 320, 32, 32, device=device, dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.randn(320, device=device, dtype=torch.float16)
    b = torch.randn(320, device=device, dtype=torch.float16)
    _chain(x, w, b)  # autotune without PDL: both then run the tuned configs
    with grid_dependency.enabled():
        assert grid_dependency.launch_options(device)["launch_pdl"], "this GPU does not take PDL (sm_90 and later)"
        _chain(x, w, b)  # compile the PDL variants outside the capture
        static = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _chain(static, w, b)
    for seed in range(4):
        torch.manual_seed(seed + 1)
        fresh = torch.randn_like(x) * (seed + 1)
        static.copy_(fresh)
        graph.replay()
        expected = _chain(fresh, w, b)
        for i, (got, want) in enumerate(zip(outs, expected, strict=True)):
            assert torch.equal(got, want), f"replay {seed}, kernel {i}: max diff {(got - want).abs().max().item()}"


@pytest.mark.gpu
@gpu
def test_the_graph_pipeline_with_pdl_gives_the_images_of_one_without():
    import diffrt
    from diffrt.backends.cuda_graph import CudaGraphBackend

    kw = {"height": 64, "width": 96, "steps": 2, "seed": 3, "output_type": "pt"}
    without = diffrt.Pipeline.from_pretrained("tiny-sd21", device="cuda", dtype=torch.float16,
                                              backend=CudaGraphBackend())  # fmt: skip
    want = [without(p, **kw) for p in ("a photo of a cat", "a red car")]
    with grid_dependency.enabled():
        pipe = diffrt.Pipeline.from_pretrained("tiny-sd21", device="cuda", dtype=torch.float16,
                                               backend=CudaGraphBackend())  # fmt: skip
        got = [pipe(p, **kw) for p in ("a photo of a cat", "a red car")]  # captured, then replayed
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all() and g.std() > 1e-3
        assert (g.float() - w.float()).abs().max().item() <= 2e-3
