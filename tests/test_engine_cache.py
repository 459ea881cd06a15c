"""The TensorRT engine cache: one test per invalidation rule (the ONNX, the profile, the precision, the recorded GPU
or version, a truncated or corrupt engine, an interrupted build, a runtime that cannot deserialize), profiles per
component, `diffrt build-engine`'s arguments, and the tensorrt backend where an engine can run.

Everything here is the real cache code on real export folders; the one stand-in is the builder (TensorRT's, which
needs a GPU and the library): a function returning bytes that name what it was asked to build.
"""

import json
import os

import pytest
import torch

from diffrt.export.engine_cache import EngineTarget
from diffrt.export.engines import build_engines, engine_requests
from diffrt.export.exported import open_export
from diffrt.export.profiles import DYNAMIC_256_1024, STATIC_512, Profile
from tests.helpers.export_fixtures import exported

H200 = EngineTarget("tensorrt_rtx", "1.7.1.116", "NVIDIA H200", "9.0")
RTX4090 = EngineTarget("tensorrt", "10.13.0", "NVIDIA GeForce RTX 4090", "8.9")


class Builder:
    """Stands in for TensorRT's builder: records each call and returns bytes naming the request."""

    def __init__(self):
        self.calls = []

    def __call__(self, onnx_path, request):
        self.calls.append((os.path.basename(onnx_path), request))
        return b"ENGINE " + json.dumps([request.component, request.onnx_sha256, request.precision]).encode() * 50


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("engines"))
    return {seed: exported(root, "tiny-sd15", names=["vae_decoder"], seed=seed, checks=()) for seed in (0, 1)}


def build(folder, cache_dir, builder, profile=STATIC_512, target=H200, **kwargs):
    return build_engines(folder, profile, target=target, builder=builder, cache_dir=cache_dir, **kwargs)["vae_decoder"]


def meta_path(result) -> str:
    return result.path.removesuffix(".plan") + ".json"


def test_built_once_then_taken_from_the_cache(folders, tmp_path):
    builder = Builder()
    first = build(folders[0], tmp_path, builder)
    assert first.built and first.reason == "not cached" and len(builder.calls) == 1
    assert builder.calls[0][0] == "vae_decoder.onnx"
    second = build(folders[0], tmp_path, builder)
    assert not second.built and second.reason == "cached" and len(builder.calls) == 1
    assert second.engine == first.engine and second.path == first.path
    with open(meta_path(first)) as f:
        meta = json.load(f)
    assert meta["fields"]["target"] == {"flavour": "tensorrt_rtx", "version": "1.7.1.116", "gpu": "NVIDIA H200",
                                        "compute_capability": "9.0"}  # fmt: skip
    assert meta["fields"]["request"]["shapes"] == {"latent_sample": [[1, 4, 64, 64]] * 3}


def test_changed_onnx_rebuilds(folders, tmp_path):
    builder = Builder()
    a, b = build(folders[0], tmp_path, builder), build(folders[1], tmp_path, builder)  # other weights, other hash
    assert a.built and b.built and a.path != b.path and len(builder.calls) == 2
    assert builder.calls[0][1].onnx_sha256 != builder.calls[1][1].onnx_sha256
    assert not build(folders[0], tmp_path, builder).built  # each keeps its own entry


def test_changed_profile_rebuilds(folders, tmp_path):
    builder = Builder()
    build(folders[0], tmp_path, builder, STATIC_512)
    dynamic = build(folders[0], tmp_path, builder, DYNAMIC_256_1024)
    assert dynamic.built and len(builder.calls) == 2
    assert builder.calls[1][1].shapes == {"latent_sample": [[1, 4, 32, 32], [1, 4, 64, 64], [4, 4, 128, 128]]}


def test_changed_precision_rebuilds(folders, tmp_path):
    builder = Builder()
    build(folders[0], tmp_path, builder, precision="onnx")
    flagged = build(folders[0], tmp_path, builder, precision="fp16")  # the fp16 builder flag on this fp32 export
    assert flagged.built and [c[1].precision for c in builder.calls] == ["onnx:float32", "fp16"]


@pytest.mark.parametrize("field, value", [("gpu", "NVIDIA H100 80GB HBM3"), ("version", "1.6.0.0")])
def test_recorded_gpu_or_version_that_differs_rebuilds(folders, tmp_path, field, value):
    builder = Builder()
    first = build(folders[0], tmp_path, builder)
    with open(meta_path(first)) as f:
        meta = json.load(f)
    meta["fields"]["target"][field] = value  # the entry says it was built by another TensorRT, for another GPU
    with open(meta_path(first), "w") as f:
        json.dump(meta, f)
    again = build(folders[0], tmp_path, builder)
    assert again.built and len(builder.calls) == 2
    assert again.reason == f"recorded for another build: target.{field} {value!r} != {getattr(H200, field)!r}"
    assert not build(folders[0], tmp_path, builder).built  # the rebuilt entry is valid


def test_another_gpu_gets_its_own_engine(folders, tmp_path):
    builder = Builder()
    here, there = build(folders[0], tmp_path, builder, target=H200), build(folders[0], tmp_path, builder,
                                                                         target=RTX4090)  # fmt: skip
    assert here.built and there.built and here.path != there.path


def test_truncated_engine_is_rebuilt_never_used(folders, tmp_path):
    builder = Builder()
    first = build(folders[0], tmp_path, builder)
    os.truncate(first.path, first.bytes // 2)
    seen = []
    again = build(folders[0], tmp_path, builder, deserialize=lambda data: seen.append(data) or data)
    assert again.built and "truncated" in again.reason
    assert seen == [first.engine]  # the runtime was handed only the rebuilt, complete engine


def test_corrupt_engine_is_rebuilt(folders, tmp_path):
    builder = Builder()
    first = build(folders[0], tmp_path, builder)
    with open(first.path, "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x00\x00")
    again = build(folders[0], tmp_path, builder)
    assert again.built and again.reason == "engine bytes do not match their recorded sha256 (corrupt)"


def test_engine_replaced_by_a_symlink_is_rebuilt(folders, tmp_path):
    builder = Builder()
    first = build(folders[0], tmp_path, builder)
    os.rename(first.path, tmp_path / "elsewhere.plan")
    os.symlink(tmp_path / "elsewhere.plan", first.path)
    again = build(folders[0], tmp_path, builder)
    assert again.built and again.reason == "engine path is not a regular file" and not os.path.islink(first.path)


def test_interrupted_build_leaves_no_usable_entry(folders, tmp_path):
    def failing(onnx_path, request):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        build(folders[0], tmp_path, failing)
    assert not any(name.endswith(".json") for name in os.listdir(tmp_path))
    builder = Builder()
    assert build(folders[0], tmp_path, builder).built and len(builder.calls) == 1


def test_engine_without_metadata_is_rebuilt(folders, tmp_path):
    builder = Builder()
    first = build(folders[0], tmp_path, builder)
    os.unlink(meta_path(first))
    again = build(folders[0], tmp_path, builder)
    assert again.built and again.reason == "engine without metadata (an interrupted build)"


def test_an_engine_the_runtime_refuses_is_rebuilt_once_then_an_error(folders, tmp_path):
    builder = Builder()
    build(folders[0], tmp_path, builder)
    answers = iter([None, "engine object"])  # the cached one refused, the rebuilt one accepted
    again = build(folders[0], tmp_path, builder, deserialize=lambda data: next(answers))
    assert again.built and again.engine == "engine object" and "could not deserialize" in again.reason
    with pytest.raises(RuntimeError, match="built this engine but cannot deserialize it on NVIDIA H200"):
        build(folders[0], tmp_path, builder, deserialize=lambda data: None)


def test_profiles_per_component(root_export):
    model = open_export(root_export)
    dyn = engine_requests(model, DYNAMIC_256_1024)
    assert dyn["unet"].shapes["sample"] == [[1, 4, 32, 32], [2, 4, 64, 64], [8, 4, 128, 128]]  # CFG: 2x the images
    assert dyn["unet"].shapes["encoder_hidden_states"] == [[1, 77, 32], [2, 77, 32], [8, 77, 32]]
    assert "timestep" not in dyn["unet"].shapes  # static (0-d): no profile entry
    assert dyn["text_encoder"].shapes == {"input_ids": [[1, 77], [1, 77], [4, 77]]}
    assert dyn["vae_encoder"].shapes["sample"] == [[1, 3, 256, 256], [1, 3, 512, 512], [4, 3, 1024, 1024]]
    static = engine_requests(model, STATIC_512)
    assert static["unet"].shapes["sample"] == [[2, 4, 64, 64]] * 3
    no_cfg = engine_requests(model, Profile.static((1, 512, 512), cfg=False))
    assert no_cfg["unet"].shapes["sample"] == [[1, 4, 64, 64]] * 3
    with pytest.raises(ValueError, match="min .* <= opt .* <= max .* must hold"):
        Profile((2, 512, 512), (1, 512, 512), (4, 512, 512))
    with pytest.raises(ValueError, match="positive multiples of 8"):
        Profile.static((1, 500, 512))


def test_precision_of_each_component(root_export, tmp_path_factory):
    from diffrt.export.engines import component_precision

    fp32 = open_export(root_export)
    assert component_precision(fp32, "unet", "onnx") == "onnx:float32"
    assert component_precision(fp32, "unet", "bf16") == "bf16"
    root = str(tmp_path_factory.mktemp("fp16"))
    half = open_export(exported(root, "tiny-sdxl", torch.float16, names=["text_encoder_2", "unet", "vae_decoder"]))
    assert component_precision(half, "unet", "fp16") == "onnx:float16"  # strongly typed, the export's own
    assert component_precision(half, "vae_decoder", "fp16") == "onnx:float32"  # the SDXL VAE stays fp32
    with pytest.raises(ValueError, match="unet was exported in float16; a bf16 engine is built from an fp32 export"):
        component_precision(half, "unet", "bf16")


@pytest.fixture(scope="module")
def root_export(tmp_path_factory):
    return exported(str(tmp_path_factory.mktemp("sd15")), "tiny-sd15")


def test_build_engine_cli_profiles_and_refusal(root_export, capsys):
    import importlib.util

    from diffrt.cli import build_parser, main
    from diffrt.export.cli import profile_from_args

    parse = build_parser().parse_args
    assert profile_from_args(parse(["build-engine", "d"])) == DYNAMIC_256_1024
    assert profile_from_args(parse(["build-engine", "d", "--static", "1,512,512"])) == STATIC_512
    p = profile_from_args(parse(["build-engine", "d", "--min", "1,256,256", "--opt", "2,512,768", "--max",
                                 "4,768,1024", "--no-cfg"]))  # fmt: skip
    assert p == Profile((1, 256, 256), (2, 512, 768), (4, 768, 1024), cfg=False)
    with pytest.raises(ValueError, match="needs all of --min, --opt and --max"):
        profile_from_args(parse(["build-engine", "d", "--min", "1,256,256"]))
    with pytest.raises(ValueError, match="--static excludes"):
        profile_from_args(parse(["build-engine", "d", "--static", "1,512,512", "--max", "1,512,512"]))
    if importlib.util.find_spec("tensorrt") or importlib.util.find_spec("tensorrt_rtx"):
        pytest.skip("TensorRT is installed here: the refusal below is for machines without it")
    assert main(["build-engine", root_export, "--static", "1,512,512"]) == 2
    assert "no TensorRT Python module could be imported" in capsys.readouterr().err


def _runnable_tensorrt_or_skip():
    """Skip with the precise reason an engine cannot run here."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from diffrt.export.tensorrt_build import import_tensorrt

    try:
        trt, flavour = import_tensorrt()
    except ImportError as e:
        pytest.skip(str(e))
    major, minor = torch.cuda.get_device_capability()
    if flavour == "tensorrt_rtx" and (major, minor) == (9, 0):
        reason = f"TensorRT-RTX {trt.__version__} builds engines on compute capability 9.0 (H100/H200) but its "
        pytest.skip(reason + "runtime does not run them there (SM90 is not among its supported compute capabilities)")
    return trt, flavour


@pytest.mark.gpu
@pytest.mark.parametrize("profile", [STATIC_512, Profile((1, 64, 64), (1, 64, 96), (2, 128, 128))])
def test_tensorrt_backend_matches_torch(tmp_path, profile):
    _runnable_tensorrt_or_skip()
    from diffrt.backends.tensorrt import TensorRTBackend
    from diffrt.pipeline import Pipeline

    size = {"height": 512, "width": 512} if profile.is_static else {"height": 64, "width": 96}
    call = {"steps": 2, "sampler": "euler_a", "seed": 3, "guidance_scale": 4.0, "output_type": "np", **size}
    reference = Pipeline.from_pretrained("tiny-sd15", device="cuda", dtype=torch.float16)
    backend = TensorRTBackend(profile=profile, cache_dir=tmp_path)
    pipe = Pipeline.from_pretrained("tiny-sd15", device="cuda", dtype=torch.float16, backend=backend)
    want = reference("a red circle", **call)
    for _ in range(2):  # static: the second call replays the captured CUDA graphs
        diff = float(abs(pipe("a red circle", **call) - want).max())
        assert diff <= 2e-2
