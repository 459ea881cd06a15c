"""The tensorrt backend: the pipeline's roles as TensorRT engines (`import tensorrt` or `import tensorrt_rtx`).

    Pipeline.from_export("out/", device="cuda", backend=TensorRTBackend(profile=STATIC_512))  # engines: out/engines
    Pipeline.from_pretrained("sd21", device="cuda", dtype=torch.float16, backend="tensorrt")   # export + build

Each engine runs with `execute_async_v3` on a CUDA stream of its own (ordered against torch's by stream waits, no
host sync) over device buffers allocated once per input-shape bucket and bound with `set_tensor_address`; inputs are
copied into them, outputs copied out. With a static profile (min = opt = max, the default for cuda_graph) the first
run of a bucket is followed by a CUDA-graph capture of the enqueue, and later calls replay it. Engines come from the
engine cache (diffrt.export.engine_cache): one that fails a check, or that the runtime cannot deserialize, is rebuilt,
never run. TensorRT-RTX's runtime cache (its just-in-time kernels) is kept beside the engines when it has one.

Verified here: engine building with TensorRT-RTX on an H200 (it cannot run engines there: compute capability 9.0 is
not in its list). Execution is written against the documented API of both modules and tested where one can run.
"""

import os
from collections import OrderedDict

import torch
from torch import Tensor

from diffrt.backends.graph_roles import graph_roles
from diffrt.components import Components
from diffrt.export.profiles import DYNAMIC_256_1024, Profile
from diffrt.plan import GenerationPlan, run_plan
from diffrt.roles import Roles
from diffrt.samplers import Callback


def torch_dtype(trt, dtype) -> torch.dtype:
    import numpy as np

    return {np.float32: torch.float32, np.float16: torch.float16, np.int32: torch.int32, np.int64: torch.int64,
            np.bool_: torch.bool}[trt.nptype(dtype)]  # fmt: skip


class TrtRunner:
    """One engine: {input: tensor} -> {output: tensor} on the GPU."""

    def __init__(self, trt, engine, device: torch.device, cuda_graph: bool, runtime_config=None, max_buckets: int = 4):
        self.trt, self.engine, self.device = trt, engine, torch.device(device)
        self.context = engine.create_execution_context(runtime_config) if runtime_config else (
            engine.create_execution_context())  # fmt: skip
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of device memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == inputs]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) != inputs]
        self.dtypes = {n: torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.stream = torch.cuda.Stream(self.device)
        self.cuda_graph, self.max_buckets = cuda_graph, max_buckets
        self._buckets: OrderedDict[tuple, dict] = OrderedDict()
        self._bound: tuple | None = None  # the bucket whose shapes and addresses the context holds

    def _check_profile(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for name in self.inputs:
            fixed = tuple(self.engine.get_tensor_shape(name))
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0) if -1 in fixed else (fixed, fixed, fixed)
            if not all(a <= n <= b for a, n, b in zip(tuple(lo), shapes[name], tuple(hi), strict=True)):
                raise ValueError(
                    f"input {name} of shape {shapes[name]} is outside this engine's profile {tuple(lo)}..{tuple(hi)}; "
                    "build an engine whose profile covers it (diffrt build-engine --min/--opt/--max or --static)"
                )

    def _bucket(self, shapes: dict[str, tuple[int, ...]]) -> dict:
        key = tuple(sorted(shapes.items()))
        if key not in self._buckets:
            self._check_profile(shapes)
            for name in self.inputs:
                self.context.set_input_shape(name, shapes[name])
            ins = {n: torch.empty(shapes[n], dtype=self.dtypes[n], device=self.device) for n in self.inputs}
            outs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
                    for n in self.outputs}  # fmt: skip
            self._buckets[key] = {"key": key, "shapes": shapes, "ins": ins, "outs": outs, "graph": None, "runs": 0}
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
            self._bound = None
        self._buckets.move_to_end(key)
        return self._buckets[key]

    def _bind(self, bucket: dict) -> None:
        if self._bound == bucket["key"]:
            return
        for name in self.inputs:
            self.context.set_input_shape(name, bucket["shapes"][name])
        for name, t in (*bucket["ins"].items(), *bucket["outs"].items()):
            self.context.set_tensor_address(name, t.data_ptr())
        self._bound = bucket["key"]

    def __call__(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        bucket = self._bucket({n: tuple(feeds[n].shape) for n in self.inputs})
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for name in self.inputs:
                bucket["ins"][name].copy_(feeds[name])
            if bucket["graph"] is not None:
                bucket["graph"].replay()
            else:
                self._bind(bucket)
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("TensorRT's execute_async_v3 failed; its log above says why")
                bucket["runs"] += 1
                if self.cuda_graph and bucket["runs"] == 1:  # captured after one warm-up run (lazy setup inside)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        self.context.execute_async_v3(self.stream.cuda_stream)
                    bucket["graph"] = graph
            outs = {name: t.clone() for name, t in bucket["outs"].items()}
        current.wait_stream(self.stream)
        for t in outs.values():
            t.record_stream(current)
        return outs


class TensorRTBackend:
    """Roles as TensorRT engines built for `profile` from an export folder (or from the pipeline's own modules,
    exported on the fly into `cache_dir`). precision: "onnx" (strongly typed: the export's types), or "fp16"/"bf16"
    (builder flag on an fp32 export, full TensorRT only). cuda_graph: capture static shapes (default: when the
    profile is static)."""

    name = "tensorrt"

    def __init__(
        self,
        export_dir: str | os.PathLike | None = None,
        *,
        profile: Profile = DYNAMIC_256_1024,
        precision: str = "onnx",
        engine_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        opt_level: int = 3,
        timing_cache: str | None = None,
        cuda_graph: bool | None = None,
        flavour: str | None = None,
    ) -> None:
        from diffrt.backends.onnxruntime import default_cache_dir

        self.export_dir = None if export_dir is None else os.fspath(export_dir)
        self.profile, self.precision, self.opt_level, self.timing_cache = profile, precision, opt_level, timing_cache
        self.engine_dir = None if engine_dir is None else os.fspath(engine_dir)
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cuda_graph = profile.is_static if cuda_graph is None else cuda_graph
        self.flavour = flavour
        self._runtime_cache = None  # TensorRT-RTX: (IRuntimeCache, path), once a context uses one

    def roles(self, components: Components, dtype: torch.dtype) -> Roles:
        from diffrt.export.exported import open_export
        from diffrt.export.exporter import export_cached

        device = next(components.unet.parameters()).device
        folder = self.export_dir or export_cached(components, dtype, device, os.path.join(self.cache_dir, "onnx"))
        return self.roles_for_export(open_export(folder), device, dtype)

    def roles_for_export(self, model, device: str | torch.device, dtype: torch.dtype) -> Roles:
        """Roles over an opened export (diffrt.export.exported.ExportedModel): its engines built or taken from the
        cache (default MODEL_FOLDER/engines), each run by a TrtRunner."""
        from diffrt.export.engines import build_engines
        from diffrt.export.tensorrt_build import detect_target, import_tensorrt, make_builder

        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"the tensorrt backend runs on a CUDA device, not {device}")
        trt, flavour = import_tensorrt(self.flavour)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        results = build_engines(
            model, self.profile, target=detect_target(trt, flavour, device.index or 0),
            builder=make_builder(trt, flavour, opt_level=self.opt_level, timing_cache=self.timing_cache),
            precision=self.precision, cache_dir=self.engine_dir, opt_level=self.opt_level,
            deserialize=runtime.deserialize_cuda_engine,
        )  # fmt: skip
        config = self._runtime_config  # TensorRT-RTX: one runtime cache for this backend's contexts
        runners = {name: TrtRunner(trt, r.engine, device, self.cuda_graph, config(r.engine, model.folder))
                   for name, r in results.items()}  # fmt: skip
        return graph_roles(model, runners.__getitem__, device, dtype)

    def _runtime_config(self, engine, folder: str):
        """TensorRT-RTX: a runtime config sharing this backend's one runtime cache (None for full TensorRT)."""
        config = engine.create_runtime_config() if hasattr(engine, "create_runtime_config") else None
        if config is None or not hasattr(config, "create_runtime_cache"):
            return None
        if self._runtime_cache is None:
            cache = config.create_runtime_cache()
            path = os.path.join(self.engine_dir or os.path.join(folder, "engines"), "runtime.cache")
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    cache.deserialize(f.read())
            self._runtime_cache = (cache, path)
        config.set_runtime_cache(self._runtime_cache[0])
        return config

    def save_runtime_cache(self) -> str | None:
        """Write TensorRT-RTX's runtime cache (kernels compiled while running) beside the engines."""
        from diffrt.export.files import write_atomically

        if self._runtime_cache is None:
            return None
        cache, path = self._runtime_cache
        write_atomically(path, bytes(cache.serialize()))
        return path

    def run(self, plan: GenerationPlan, roles: Roles, callback: Callback | None = None) -> tuple[Tensor, Tensor]:
        return run_plan(plan, roles, callback)

    def __repr__(self) -> str:
        return f"TensorRTBackend({self.export_dir!r}, profile={self.profile}, precision={self.precision!r})"
