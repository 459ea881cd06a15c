"""One torch module to one `.onnx` file: trace, fold constants, infer shapes, check, and write it atomically, with its
weights in one external-data file beside it when the model is over protobuf's 2 GB limit.

The TorchScript exporter (`dynamo=False`) is the one the TensorRT demo uses; it needs no onnxscript and takes
`dynamic_axes` by name. Torch writes a >2 GB model as one file per tensor, so every export goes to a private
temporary folder first, is re-saved as model + one data file, checked, and only then moved into place: a reader
never sees half a model, and a file already at the destination (a symlink or hard link planted there included) is
replaced, never written through (CVE-2025-51480 was a write through an attacker's path).
"""

import os
import shutil
import tempfile
import warnings

import onnx
import torch
from torch import nn

from diffrt.export.graphs import GraphSpec
from diffrt.export.precision import fragile_ops_in_fp32

PROTOBUF_LIMIT = 2**31 - 2**20  # protobuf's 2 GiB, less a margin for the graph itself
MIN_OPSET, MAX_OPSET = 18, 20  # 18: Optimum's; 20: the newest the TorchScript exporter writes


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET} (the TensorRT demo uses 19)")


def export_onnx(
    module: nn.Module,
    spec: GraphSpec,
    inputs: dict[str, torch.Tensor],
    path: str,
    opset: int,
    metadata: dict[str, str] | None = None,
    external_data_above: int = PROTOBUF_LIMIT,
) -> list[str]:
    """Export `module` (called with `inputs` in spec order) to `path`; returns the files written (the model, then
    its external data if any), each moved into place atomically. Weights go to one `NAME.onnx.data` file when they
    exceed `external_data_above` bytes (protobuf's limit; tests lower it to exercise the external-data path)."""
    check_opset(opset)
    folder, name = os.path.split(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{name}.") as tmp:
        raw = os.path.join(tmp, "raw", name)
        os.makedirs(os.path.dirname(raw))
        with torch.no_grad(), fragile_ops_in_fp32(), warnings.catch_warnings():
            # The exporter warns that it is the legacy one and about Python values it traced as constants (the
            # head width, layer counts): both expected here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(inputs[t.name] for t in spec.inputs),
                raw,
                dynamo=False,
                opset_version=opset,
                do_constant_folding=True,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=spec.dynamic_axes(),
            )
        model = onnx.load(raw)  # also reads the per-tensor files a >2 GB export was scattered into
        _declare_outputs(model, spec)
        for key, value in (metadata or {}).items():
            model.metadata_props.add(key=key, value=value)
        final = os.path.join(tmp, name)
        data = f"{name}.data" if _tensor_bytes(model) > external_data_above else None
        # One data file beside the model; location relative to the model's folder (onnx refuses anything else).
        onnx.save_model(model, final, save_as_external_data=data is not None, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)  # fmt: skip
        del model
        onnx.shape_inference.infer_shapes_path(final, final)  # the path form works past 2 GB
        onnx.checker.check_model(final)  # also checks the external data's location (onnx >= 1.16)
        written = [os.path.join(folder, f) for f in ([data] if data else []) + [name]]  # data first, model last
        for target in written:
            os.replace(os.path.join(tmp, os.path.basename(target)), target)
        shutil.rmtree(os.path.join(tmp, "raw"))
    return written[::-1]


def _declare_outputs(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Write the spec's output dims into the graph: the exporter names some static dims symbolically (a Concat's
    channels), and a consumer (TensorRT, IO binding) should read the interface the spec promises."""
    for value, t in zip(model.graph.output, spec.outputs, strict=True):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(t.dims):
            raise ValueError(f"exported output {value.name} has rank {len(dims)}, its spec {len(t.dims)}")
        for dim, want in zip(dims, t.dims, strict=True):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def _tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)
