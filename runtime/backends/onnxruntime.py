"""The onnxruntime backend: the pipeline's roles as ONNX Runtime sessions over an export folder (diffrt.export).

    Pipeline.from_pretrained("tiny-sd15", backend="onnxruntime")      # exports on the fly into a cache folder
    Pipeline.from_export("out/", device="cuda", backend=OnnxRuntimeBackend(cuda_graph=True))   # a `diffrt export`
                                                                      # folder alone: no torch model is built

The roles are the torch roles over exported graphs (diffrt.backends.graph_roles), so scaling, the posterior sample,
CFG batching and the SDXL VAE's fp32 are the torch backend's code, not a copy of it.

On CPU a session runs on numpy views of the tensors (no copy). On CUDA (onnxruntime-gpu installed) every input and
output is bound to torch's device memory with IO binding, ORT runs on a CUDA stream of its own ordered against
torch's by stream waits, and runs without a host sync (`disable_synchronize_execution_providers`): tensors stay on
the GPU between steps. `cuda_graph=True` additionally gives each input-shape bucket a session whose free dimensions
are fixed to it (so every node is static and on the GPU) with ORT's CUDA graph on; ORT captures it on its first runs
and replays it after. Each such session holds its own copy of the weights: `max_graphs` bounds how many are kept.
"""

import os
from collections import OrderedDict

import numpy as np
import torch
from torch import Tensor

from diffrt.backends.graph_roles import graph_roles
from diffrt.components import Components
from diffrt.export.graphs import GraphSpec
from diffrt.plan import GenerationPlan, run_plan
from diffrt.roles import Roles
from diffrt.samplers import Callback

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32, torch.int64: np.int64}


def default_cache_dir() -> str:
    """$DIFFRT_CACHE, else ~/.cache/diffrt: exports and engines made on the fly live below it."""
    return os.environ.get("DIFFRT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diffrt")


class OrtRunner:
    """One exported graph on ONNX Runtime: {input: tensor} -> {output: tensor}, on the tensors' device."""

    def __init__(
        self,
        path: str,
        spec: GraphSpec,
        device: torch.device,
        *,
        providers: list | None = None,
        threads: int | None = None,
        cuda_graph: bool = False,
        max_graphs: int = 2,
    ) -> None:
        import onnxruntime as ort

        self.ort, self.path, self.spec, self.device = ort, path, spec, torch.device(device)
        self.threads, self.cuda_graph, self.max_graphs = threads, cuda_graph, max_graphs
        self.cuda = self.device.type == "cuda"
        if self.cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(
                "the onnxruntime backend on CUDA needs onnxruntime-gpu (CUDAExecutionProvider); this onnxruntime has "
                f"{ort.get_available_providers()}: pip install onnxruntime-gpu, or run on device='cpu'"
            )
        if self.cuda:
            from diffrt.export.ort_check import preload_cuda_libraries

            preload_cuda_libraries()
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.providers = providers or self._providers()
        self.run_options = ort.RunOptions()
        if self.cuda:  # no host sync at the end of each run: ordering is by the stream waits below
            self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.session = None if cuda_graph else self._session({})
        self._static: OrderedDict[tuple, tuple] = OrderedDict()  # shape bucket -> (session, binding, ins, outs)

    def _providers(self) -> list:
        if not self.cuda:
            return ["CPUExecutionProvider"]
        options = {"device_id": self.device.index or 0, "user_compute_stream": str(self.stream.cuda_stream),
                   "enable_cuda_graph": "1" if self.cuda_graph else "0"}  # fmt: skip
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]

    def _session(self, fixed_dims: dict[str, int]):
        options = self.ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        for name, value in fixed_dims.items():
            options.add_free_dimension_override_by_name(name, value)
        session = self.ort.InferenceSession(self.path, options, providers=self.providers)
        if self.cuda and session.get_providers()[0] != "CUDAExecutionProvider":  # ORT falls back to the CPU silently
            raise RuntimeError(
                f"{self.path}: ONNX Runtime could not start its CUDA provider (it fell back to "
                f"{session.get_providers()}); see its log above: usually CUDA or cuDNN libraries it cannot find"
            )
        return session

    def __call__(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.cuda:
            outs = self.session.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
            return {t.name: torch.from_numpy(o) for t, o in zip(self.spec.outputs, outs, strict=True)}
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        out_shapes = self.spec.output_shapes(shapes)
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # ORT reads what torch wrote
        with torch.cuda.stream(self.stream):
            if self.cuda_graph:
                outs = self._run_static(feeds, shapes, out_shapes)
            else:
                outs = self._run_bound(feeds, out_shapes)
        current.wait_stream(self.stream)  # torch reads what ORT wrote
        for t in (*feeds.values(), *outs.values()):
            t.record_stream(current)
            t.record_stream(self.stream)
        return outs

    def _bind(self, binding, name: str, t: Tensor, output: bool) -> None:
        args = (name, "cuda", self.device.index or 0, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        (binding.bind_output if output else binding.bind_input)(*args)

    def _outputs(self, out_shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
        return {t.name: torch.empty(out_shapes[t.name], dtype=getattr(torch, t.dtype), device=self.device)
                for t in self.spec.outputs}  # fmt: skip

    def _run_bound(self, feeds: dict[str, Tensor], out_shapes) -> dict[str, Tensor]:
        binding = self.session.io_binding()
        feeds = {k: v.contiguous() for k, v in feeds.items()}
        for name, t in feeds.items():
            self._bind(binding, name, t, output=False)
        outs = self._outputs(out_shapes)
        for name, t in outs.items():
            self._bind(binding, name, t, output=True)
        self.session.run_with_iobinding(binding, self.run_options)
        return outs

    def _run_static(self, feeds: dict[str, Tensor], shapes, out_shapes) -> dict[str, Tensor]:
        """A CUDA graph per shape bucket: inputs copied into fixed buffers, outputs copied out of fixed ones."""
        key = tuple(sorted(shapes.items()))
        if key not in self._static:
            fixed = {}
            for t in self.spec.inputs:
                fixed.update({d: n for d, n in zip(t.dims, shapes[t.name], strict=True) if isinstance(d, str)})
            session = self._session(fixed)
            binding = session.io_binding()
            ins = {k: torch.empty_like(v, memory_format=torch.contiguous_format) for k, v in feeds.items()}
            outs = self._outputs(out_shapes)
            for name, t in ins.items():
                self._bind(binding, name, t, output=False)
            for name, t in outs.items():
                self._bind(binding, name, t, output=True)
            self._static[key] = (session, binding, ins, outs)
            while len(self._static) > self.max_graphs:
                self._static.popitem(last=False)
        self._static.move_to_end(key)
        session, binding, ins, outs = self._static[key]
        for name, t in feeds.items():
            ins[name].copy_(t)
        session.run_with_iobinding(binding, self.run_options)
        return {name: t.clone() for name, t in outs.items()}  # the fixed buffers are rewritten by the next replay


class OnnxRuntimeBackend:
    """Roles as ONNX Runtime sessions. export_dir: a `diffrt export` folder to run (its files checked against its
    manifest first); None: export the pipeline's own modules on first use into `cache_dir`, keyed by their weights,
    dtype and opset, and reuse that export next time. providers: ORT's, overriding the device's default."""

    name = "onnxruntime"

    def __init__(
        self,
        export_dir: str | os.PathLike | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        opset: int = 18,
        providers: list | None = None,
        threads: int | None = None,
        cuda_graph: bool = False,
        max_graphs: int = 2,
    ) -> None:
        self.export_dir = None if export_dir is None else os.fspath(export_dir)
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else os.path.join(default_cache_dir(), "onnx")
        self.opset, self.providers, self.threads = opset, providers, threads
        self.cuda_graph, self.max_graphs = cuda_graph, max_graphs

    def roles(self, components: Components, dtype: torch.dtype) -> Roles:
        from diffrt.export.exported import open_export
        from diffrt.export.exporter import export_cached

        device = next(components.unet.parameters()).device
        folder = self.export_dir or export_cached(components, dtype, device, self.cache_dir, self.opset)
        return self.roles_for_export(open_export(folder), device, dtype)

    def roles_for_export(self, model, device: str | torch.device, dtype: torch.dtype) -> Roles:
        """Roles over an opened export (diffrt.export.exported.ExportedModel) on `device`; latents in `dtype`."""
        device = torch.device(device)

        def runner(name: str) -> OrtRunner:
            # ORT keeps the text encoders' token-index ops (the end-of-text position for the pooled output) on the
            # CPU, and refuses a CUDA graph for a session not wholly on its CUDA provider (seen on the H200): the
            # text encoders run with IO binding but without one, once per prompt.
            graph = self.cuda_graph and not name.startswith("text_encoder")
            return OrtRunner(model.model_path(name), model.graph(name), device, providers=self.providers,
                             threads=self.threads, cuda_graph=graph, max_graphs=self.max_graphs)  # fmt: skip

        return graph_roles(model, runner, device, dtype)

    def run(self, plan: GenerationPlan, roles: Roles, callback: Callback | None = None) -> tuple[Tensor, Tensor]:
        return run_plan(plan, roles, callback)

    def __repr__(self) -> str:
        where = self.export_dir or f"cache {self.cache_dir}"
        return f"OnnxRuntimeBackend({where!r}, cuda_graph={self.cuda_graph})"
