"""An exported component run by an ONNX Runtime session against the torch module it came from."""

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffrt.export.graphs import GraphSpec, sample_inputs


@dataclass(frozen=True)
class CheckShape:
    """One shape a component is checked at: batch, image pixels, and the text's sequence length."""

    batch: int
    height: int  # pixels, a multiple of 8
    width: int
    sequence: int = 77

    def __post_init__(self):
        if self.batch < 1 or self.sequence < 1 or self.height % 8 or self.width % 8 or min(self.height, self.width) < 8:
            raise ValueError(f"check shape {self}: batch and sequence >= 1, height and width positive multiples of 8")

    @property
    def axes(self) -> dict[str, int]:
        return {"batch": self.batch, "sequence": self.sequence, "height": self.height // 8, "width": self.width // 8}

    @classmethod
    def parse(cls, text: str) -> "CheckShape":
        """Read "B,H,W" or "B,H,W,S" (pixels; S the token count)."""
        try:
            return cls(*(int(v) for v in text.split(",")))
        except (TypeError, ValueError) as e:
            raise ValueError(f"check shape {text!r}: write BATCH,HEIGHT,WIDTH[,SEQUENCE], e.g. 2,512,768 ({e})") from e


DEFAULT_CHECKS = (CheckShape(1, 64, 96, 77), CheckShape(2, 48, 32, 20))  # two resolutions, batches, sequences


def providers_for(device: torch.device | str) -> list:
    """CUDA where the device is a GPU and onnxruntime-gpu is installed; the CPU provider always last. The check runs
    without TF32 on both sides (ORT's `use_tf32`, and check_session's torch reference): TF32's 10-bit mantissa alone
    puts an fp32 VAE decoder 1.8e-3 off on the H200, over the 1e-4 an fp32 export is held to."""
    import onnxruntime as ort

    cuda = torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    if cuda:
        preload_cuda_libraries()
    return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


_preloaded = False


def preload_cuda_libraries() -> None:
    """onnxruntime-gpu >= 1.21 finds the CUDA and cuDNN libraries that torch's wheels ship only once told to
    (`onnxruntime.preload_dlls`); without it the CUDA provider fails to load and ORT falls back to the CPU."""
    global _preloaded
    import onnxruntime as ort

    if not _preloaded and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    _preloaded = True


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (benchmarks/accuracy.py's measure, which the package cannot import)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise ValueError(f"output shape {tuple(actual.shape)} != the torch module's {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


@contextmanager
def _no_tf32_matmul():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def check_session(
    session, graph: nn.Module, spec: GraphSpec, shape: CheckShape, hidden_layer: int, tolerance: float, seed: int = 1
) -> dict:
    """Run `session` and `graph` (the torch reference, in fp32 or the export's dtype) on the same random inputs at
    `shape`; the max relative error per output (max |ort - torch| / max |torch|) and whether all are in tolerance."""
    inputs = sample_inputs(spec, shape.axes, seed=seed, hidden_layer=hidden_layer)
    device, ref_dtype = next(graph.parameters()).device, next(graph.parameters()).dtype
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False), _no_tf32_matmul():
        ref = graph(*(t.to(device, ref_dtype) if t.is_floating_point() and t.ndim else t.to(device) for t in
                      inputs.values()))  # fmt: skip
    ref = ref if isinstance(ref, tuple) else (ref,)
    feeds = {name: to_numpy(t) for name, t in inputs.items()}
    outs = session.run([t.name for t in spec.outputs], feeds)
    errors = {
        t.name: max_rel_error(torch.from_numpy(np.asarray(o, dtype=np.float64)), r.double().cpu())
        for t, o, r in zip(spec.outputs, outs, ref, strict=True)
    }
    worst = max(errors.values())
    return {
        "shape": {"batch": shape.batch, "height": shape.height, "width": shape.width, "sequence": shape.sequence},
        "hidden_layer": hidden_layer if any(t.name == "hidden_layer" for t in spec.inputs) else None,
        "providers": session.get_providers(),
        "max_rel_error": errors,
        "tolerance": tolerance,
        "ok": bool(worst <= tolerance),
    }
