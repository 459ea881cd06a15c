"""Engines from our ONNX with TensorRT: `import tensorrt` (NVIDIA's full TensorRT) or `import tensorrt_rtx`, whichever
is installed, through the API the two share (TensorRT 10's: Builder, OnnxParser, strongly typed networks, optimization
profiles, builder optimization level, timing cache).

- Strongly typed (the default, and TensorRT-RTX's only mode): each layer runs in the ONNX's own types, so an fp16
  export gives an fp16 engine with the export's fp32 softmax and normalization statistics kept.
- precision "fp16" / "bf16": a weakly typed build of an fp32 export with that builder flag (full TensorRT only): the
  builder picks per layer, which is faster to set up and less predictable.
- Optimization level 3 is TensorRT's default and the demo's; higher levels search longer.
- A timing cache (file) makes a rebuild reuse kernel timings; TensorRT-RTX builds ahead of time without timing and
  compiles kernels when it runs, which its runtime cache (diffrt.backends.tensorrt) keeps instead.
"""

import os

from diffrt.export.engine_cache import Builder, EngineRequest, EngineTarget
from diffrt.export.files import write_atomically

FLAVOURS = ("tensorrt", "tensorrt_rtx")
PRECISIONS = ("onnx", "fp16", "bf16")


def import_tensorrt(prefer: str | None = None):
    """(module, flavour): `tensorrt` if importable, else `tensorrt_rtx` (or only `prefer`). ImportError says how."""
    import importlib

    names = [prefer] if prefer else list(FLAVOURS)
    errors = []
    for name in names:
        try:
            return importlib.import_module(name), name
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError(
        "no TensorRT Python module could be imported (" + "; ".join(errors) + "): install NVIDIA's TensorRT "
        "(pip install tensorrt, from NVIDIA's index) or TensorRT-RTX (pip install tensorrt-rtx)"
    )


def detect_target(trt, flavour: str, device: int = 0) -> EngineTarget:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("building a TensorRT engine needs a CUDA GPU; none is visible to torch")
    major, minor = torch.cuda.get_device_capability(device)
    return EngineTarget(flavour, trt.__version__, torch.cuda.get_device_name(device), f"{major}.{minor}")


def make_builder(trt, flavour: str, *, opt_level: int = 3, timing_cache: str | None = None) -> Builder:
    """A builder function for diffrt.export.engine_cache.EngineCache: (onnx path, request) -> engine bytes."""
    if not 0 <= opt_level <= 5:
        raise ValueError(f"builder optimization level {opt_level}: TensorRT takes 0..5 (3 is its default)")

    def build(onnx_path: str, request: EngineRequest) -> bytes:
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        strongly_typed = request.precision.startswith("onnx")
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # TensorRT-RTX: always strong
        if not strongly_typed and flavour == "tensorrt_rtx":
            raise ValueError(
                f"precision {request.precision!r} needs a weakly typed network, which TensorRT-RTX does not build; "
                "export in that precision (diffrt export --dtype fp16) and build with the ONNX's types"
            )
        network = builder.create_network((1 << int(flag)) if strongly_typed and flag is not None else 0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(os.path.abspath(onnx_path)):  # reads external data beside the model
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"{flavour} could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.builder_optimization_level = opt_level
        if request.precision in ("fp16", "bf16"):
            flag = getattr(trt.BuilderFlag, request.precision.upper(), None)
            if flag is None:  # weakly typed builds are deprecated in TensorRT 10 and may be gone from later ones
                raise ValueError(
                    f"{flavour} {trt.__version__} has no {request.precision} builder flag; export in that precision "
                    "and build strongly typed (no precision flag)"
                )
            config.set_flag(flag)
        profile = builder.create_optimization_profile()
        for name, (lo, mid, hi) in request.shapes.items():
            profile.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(profile)
        cache = None
        if timing_cache and hasattr(config, "create_timing_cache"):
            blob = b""
            if os.path.isfile(timing_cache):
                with open(timing_cache, "rb") as f:
                    blob = f.read()
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"{flavour} failed to build an engine from {onnx_path}; its log above says why")
        if cache is not None:
            write_atomically(timing_cache, bytes(cache.serialize()))
        return bytes(plan)

    return build
