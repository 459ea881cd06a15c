"""TensorRT engines for an export folder's components, through the engine cache (what `diffrt build-engine` runs).

results = build_engines("out/", DYNAMIC_256_1024)      # {component: CacheResult}, built or found in out/engines
"""

import os
from collections.abc import Callable

from diffrt.export.engine_cache import Builder, CacheResult, EngineCache, EngineRequest, EngineTarget, onnx_identity
from diffrt.export.exported import ExportedModel, open_export
from diffrt.export.profiles import Profile
from diffrt.export.tensorrt_build import PRECISIONS

ENGINE_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


def component_precision(model: ExportedModel, component: str, precision: str) -> str:
    """The cache's precision field: "onnx:<dtype>" for a strongly typed build, or a builder flag on an fp32 graph.
    A precision flag naming the export's own dtype is the strongly typed build; an fp32 component of an fp16 export
    (the SDXL VAE, upcast because it overflows in fp16) stays fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    dtype, export_dtype = model.dtype(component), model.manifest["dtype"]
    if precision == "onnx" or {"fp16": "float16", "bf16": "bfloat16"}[precision] == dtype:
        return f"onnx:{dtype}"
    if dtype == "float32" and export_dtype != "float32":
        return f"onnx:{dtype}"  # kept in fp32 on purpose at export
    if dtype != "float32":
        raise ValueError(
            f"{component} was exported in {dtype}; a {precision} engine is built from an fp32 export (weakly typed) "
            f"or from a {precision} export (strongly typed): export with --dtype fp32 to use --{precision}"
        )
    return precision


def engine_requests(
    model: ExportedModel, profile: Profile, precision: str = "onnx", components=None, opt_level: int = 3
) -> dict[str, EngineRequest]:
    names = list(components) if components else [c for c in ENGINE_COMPONENTS if c in model.paths]
    requests = {}
    for name in names:
        model.model_path(name)  # CheckpointError naming what the folder has, if not this
        requests[name] = EngineRequest(
            component=name,
            onnx_sha256=onnx_identity(model.manifest["components"][name]),
            shapes=profile.input_shapes(name, model.graph(name)),
            precision=component_precision(model, name, precision),
            options={"builder_optimization_level": opt_level},
        )
    return requests


def build_engines(
    folder: "str | os.PathLike | ExportedModel",
    profile: Profile,
    *,
    target: EngineTarget,
    builder: Builder,
    precision: str = "onnx",
    components: list[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    opt_level: int = 3,
    deserialize: Callable[[bytes], object | None] | None = None,
    on_result: Callable[[str, CacheResult], None] | None = None,
) -> dict[str, CacheResult]:
    """Every requested component's engine for `profile`, from `folder` (checked against its manifest here, unless
    it is an ExportedModel opened already), cached in `cache_dir` (default FOLDER/engines)."""
    model = folder if isinstance(folder, ExportedModel) else open_export(folder, tuple(components or ()) or None)
    cache = EngineCache(cache_dir or os.path.join(model.folder, "engines"), target, builder)
    results = {}
    for name, request in engine_requests(model, profile, precision, components, opt_level).items():
        results[name] = cache.get(model.model_path(name), request, deserialize)
        if on_result:
            on_result(name, results[name])
    return results
