"""The onnxruntime backend: whole pipelines give the torch backend's images (within 1e-3) with no pipeline code
changed, from an export folder or exported on the fly into a cache that is reused and re-checked; clip skip and
SDXL's text conditioning on exported encoders equal the torch role's. GPU tests (IO binding, CUDA graph) run where
onnxruntime-gpu and a GPU are present."""

import os

import numpy as np
import pytest
import torch

from diffrt.backends import make_backend
from diffrt.backends.onnxruntime import OnnxRuntimeBackend
from diffrt.backends.torch_roles import TorchTextEncoder
from diffrt.cli import main
from diffrt.export.exported import open_export
from diffrt.pipeline import Pipeline
from diffrt.roles import Conditioning
from tests.helpers.export_fixtures import exported
from tests.helpers.parity import max_rel_error

CALL = {"steps": 2, "sampler": "euler_a", "seed": 3, "height": 64, "width": 96, "output_type": "np"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ort"))


def images_differ_by(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


def test_sdxl_from_an_export_folder_matches_torch(root):
    folder = exported(root, "tiny-sdxl")
    reference = Pipeline.from_pretrained("tiny-sdxl")
    pipe = Pipeline.from_export(folder)
    assert pipe.components is None and pipe.backend.name == "onnxruntime"  # no torch modules behind it
    for call in ({**CALL, "guidance_scale": 5.0}, {**CALL, "guidance_scale": 5.0, "negative_prompt": "blue"}):
        diff = images_differ_by(pipe("a red circle", **call), reference("a red circle", **call))
        assert diff <= 1e-3, call


def test_on_the_fly_export_matches_torch_and_is_cached(root, monkeypatch, tmp_path):
    """backend="onnxruntime" by name: the pipeline's own modules are exported once into $DIFFRT_CACHE, reused by the
    next pipeline (no export), re-exported when a cached file no longer matches its manifest."""
    from diffrt.export import exporter

    monkeypatch.setenv("DIFFRT_CACHE", str(tmp_path / "cache"))
    reference = Pipeline.from_pretrained("tiny-sd15")
    init = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    from PIL import Image

    calls = [{**CALL, "guidance_scale": 4.0}, {**CALL, "image": Image.fromarray(init), "strength": 0.7, "steps": 3}]
    expected = [reference("a red circle", **c) for c in calls]
    pipe = Pipeline.from_pretrained("tiny-sd15", backend="onnxruntime")
    for call, want in zip(calls, expected, strict=True):
        assert images_differ_by(pipe("a red circle", **call), want) <= 1e-3  # txt2img with CFG; img2img (encoder)
    (folder,) = os.listdir(tmp_path / "cache" / "onnx")
    folder = str(tmp_path / "cache" / "onnx" / folder)

    exports = []
    real_export = exporter.export_components
    monkeypatch.setattr(exporter, "export_components", lambda *a, **k: exports.append(1) or real_export(*a, **k))
    again = Pipeline.from_pretrained("tiny-sd15", backend="onnxruntime")
    assert exports == [] and images_differ_by(again("a red circle", **calls[0]), expected[0]) <= 1e-3
    out = tmp_path / "cli.png"
    assert main(["generate", "-p", "a red circle", "--model", "tiny-sd15", "--backend", "onnxruntime", "-W", "64",
                 "-H", "64", "--steps", "1", "--seed", "1", "-o", str(out), "--device", "cpu"]) == 0  # fmt: skip
    assert exports == [] and out.is_file()

    os.truncate(os.path.join(folder, "vae_decoder.onnx"), 100)  # a damaged cache entry is exported again
    Pipeline.from_pretrained("tiny-sd15", backend="onnxruntime")
    assert exports == [1]
    open_export(folder)


@pytest.mark.parametrize("preset", ["tiny-sd21", "tiny-sdxl"])
def test_clip_skip_on_exported_encoders_equals_torch(root, preset):
    pipe_torch = Pipeline.from_pretrained(preset)
    c = pipe_torch.components
    torch_role = TorchTextEncoder(c.text_encoder, c.text_encoder_2)
    ort_role = Pipeline.from_export(exported(root, preset)).roles.text_encoder
    ids = c.tokenizer(["a red circle", "two green squares above"])
    ids_2 = c.tokenizer_2(["a red circle", "two green squares above"]) if c.tokenizer_2 else None
    deepest = pipe_torch.spec.deepest_clip_skip
    for clip_skip in (None, 0, 1, deepest):
        with torch.no_grad():
            want, want_pooled = torch_role(ids, ids_2, clip_skip)
        got, pooled = ort_role(ids, ids_2, clip_skip)
        assert max_rel_error(got, want) <= 1e-4, clip_skip
        assert (pooled is None) == (want_pooled is None)
        if pooled is not None:
            assert max_rel_error(pooled, want_pooled) <= 1e-4
    with pytest.raises(ValueError, match=f"clip_skip {deepest + 1} is out of range"):
        ort_role(ids, ids_2, deepest + 1)


def test_controlnet_residuals_are_refused_by_name(root):
    pipe = Pipeline.from_export(exported(root, "tiny-sdxl"))
    cond = Conditioning(torch.zeros(1, 77, 72), torch.zeros(1, 24), torch.zeros(1, 6), down_residuals=(torch.zeros(1),))
    with pytest.raises(ValueError, match="exported UNets take no ControlNet residuals"):
        pipe.roles.denoiser(torch.zeros(1, 4, 8, 8), torch.tensor(1.0), cond)


def test_backend_names():
    assert make_backend("onnxruntime").name == "onnxruntime"
    assert make_backend("tensorrt").name == "tensorrt"


def _ort_cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)")


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_provider_with_io_binding_matches_torch(tmp_path, cuda_graph):
    """On the GPU: inputs and outputs bound to torch's memory, no host sync between steps; with cuda_graph, one
    static session per shape replayed from ORT's CUDA graph."""
    _ort_cuda_or_skip()
    call = {**CALL, "guidance_scale": 4.0, "steps": 3}
    reference = Pipeline.from_pretrained("tiny-sdxl", device="cuda", dtype=torch.float16)
    want = reference("a red circle", **call)
    backend = OnnxRuntimeBackend(cache_dir=tmp_path, cuda_graph=cuda_graph)
    pipe = Pipeline.from_pretrained("tiny-sdxl", device="cuda", dtype=torch.float16, backend=backend)
    for _ in range(2):  # the second call replays what the first captured
        assert images_differ_by(pipe("a red circle", **call), want) <= 2e-2


def test_generate_from_an_export_folder(root, tmp_path, capsys):
    folder = exported(root, "tiny-sd15")
    out = tmp_path / "from-folder.png"
    args = ["generate", "-p", "a red circle", "--model", folder, "-W", "64", "-H", "64", "--steps", "1", "--seed",
            "1", "-o", str(out), "--device", "cpu"]  # fmt: skip
    assert main(args) == 0 and out.is_file()  # an export folder runs on onnxruntime by default
    assert "random weights" in capsys.readouterr().err  # the manifest says what the weights are
    assert main([*args, "--backend", "torch"]) == 2
    assert "is an ONNX export folder: run it with --backend onnxruntime or tensorrt" in capsys.readouterr().err
