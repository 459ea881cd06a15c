"""A model's components to an export folder: one `.onnx` each, checked on ONNX Runtime, tokenizers, manifest.

    export_model("path/to/sd21" | "sdxl", "out/", dtype=torch.float16)   # CLI: diffrt export MODEL -o DIR

Steps per component: copy the module into the export dtype (the SDXL VAE stays fp32 under fp16, as the torch
backend runs it), trace it to ONNX with the fragile ops in fp32 (diffrt.export.precision), then run the file on ONNX
Runtime at each check shape against the torch module in fp32 on the same (rounded) weights. The manifest is written
last, so a folder whose checks failed has none and cannot be loaded.
"""

import copy
import hashlib
import json
import os
import sys
import time

import torch
from torch import nn

from diffrt.components import Components
from diffrt.export.exported import open_export
from diffrt.export.graphs import COMPONENTS, graph_module, graph_spec, sample_inputs
from diffrt.export.manifest import (
    FORMAT,
    MANIFEST,
    VERSION,
    config_record,
    file_entry,
    source_record,
    versions,
    weights_sha256,
    write_manifest,
)
from diffrt.export.onnx_files import PROTOBUF_LIMIT, check_opset, export_onnx
from diffrt.export.ort_check import DEFAULT_CHECKS, CheckShape, check_session, providers_for
from diffrt.loading.errors import CheckpointError
from diffrt.model_spec import spec_of
from diffrt.models.ops import TORCH_OPS, set_ops

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Max relative error of the file on ONNX Runtime against the torch module in fp32 with the same weights. fp16: a few
# ulps (2^-11 = 4.9e-4) accumulated through tens of layers; measured values are recorded in the manifest.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}
TRACE_AXES = {"batch": 2, "sequence": 77, "height": 8, "width": 12}  # small and unequal: no axis can be mistaken


def component_modules(components: Components) -> dict[str, nn.Module]:
    """The exportable components of a model, by export name (COMPONENTS order)."""
    modules = {"text_encoder": components.text_encoder, "text_encoder_2": components.text_encoder_2,
               "unet": components.unet, "vae_decoder": components.vae, "vae_encoder": components.vae}  # fmt: skip
    return {name: m for name, m in modules.items() if m is not None}


def export_dtype(component: str, dtype: torch.dtype, vae_upcast: bool) -> torch.dtype:
    return torch.float32 if component.startswith("vae") and vae_upcast else dtype


def export_components(
    components: Components,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    opset: int = 18,
    names: list[str] | None = None,
    source: dict | None = None,
    device: str | torch.device = "cpu",
    checks: tuple[CheckShape, ...] = DEFAULT_CHECKS,
    tolerance: float | None = None,
    progress: bool = True,
    external_data_above: int = PROTOBUF_LIMIT,
) -> dict:
    """Export `components` into `out_dir`; returns the manifest written there. `components` are not modified."""
    from tqdm import tqdm

    if dtype not in TOLERANCE:
        raise ValueError(f"export dtype {dtype} is not supported; choose {', '.join(DTYPES)}")
    check_opset(opset)
    available = component_modules(components)
    names = list(available) if names is None else list(names)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(
            f"components {unknown} are not exportable from this model; choose from {', '.join(available)} "
            f"(all exportable names: {', '.join(COMPONENTS)})"
        )
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if os.path.lexists(os.path.join(out_dir, MANIFEST)):  # the folder is incomplete until the new manifest lands
        os.unlink(os.path.join(out_dir, MANIFEST))
    spec = spec_of(components)
    device = torch.device(device)

    entries = {}
    steps = tqdm(total=len(names) * (1 + bool(checks)), desc="export", unit="step", disable=not progress,
                 file=sys.stderr)  # fmt: skip
    with steps:
        for name in names:
            module = available[name]
            dt = export_dtype(name, dtype, spec.memory.vae_upcast)
            steps.set_description(f"export {name} ({str(dt).removeprefix('torch.')})")
            work = set_ops(copy.deepcopy(module), TORCH_OPS).to(device, dt).eval().requires_grad_(False)
            graph, gspec = graph_module(name, work), graph_spec(name, work, dt)
            inputs = {k: v.to(device) for k, v in sample_inputs(gspec, TRACE_AXES, hidden_layer=1).items()}
            path = os.path.join(out_dir, f"{name}.onnx")
            start = time.perf_counter()
            files = export_onnx(graph, gspec, inputs, path, opset, metadata={"diffrt.component": name},
                                external_data_above=external_data_above)  # fmt: skip
            steps.update()
            entry = {
                **file_entry(out_dir, os.path.basename(files[0])),
                "external_data": [file_entry(out_dir, os.path.basename(f)) for f in files[1:]],
                "class": type(module).__name__,
                "config": config_record(module.config),
                "dtype": str(dt).removeprefix("torch."),
                "weights_sha256": weights_sha256(module),
                "graph": gspec.as_json(),
                "export_seconds": round(time.perf_counter() - start, 2),
                "checked": [],
            }
            if checks:
                steps.set_description(f"check {name} on ONNX Runtime")
                start = time.perf_counter()
                reference = graph_module(name, work.float())  # fp32 maths on the exported (rounded) weights
                entry["checked"] = check_file(path, name, reference, gspec, checks, device, tolerance or TOLERANCE[dt])
                entry["check_seconds"] = round(time.perf_counter() - start, 2)
                steps.update()
            del work, graph
            entries[name] = entry

    tokenizers = {}
    for key, tok in (("tokenizer", components.tokenizer), ("tokenizer_2", components.tokenizer_2)):
        if tok is not None:
            written = tok.save_pretrained(os.path.join(out_dir, key))
            tokenizers[key] = [file_entry(out_dir, f"{key}/{f}") for f in written]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "opset": opset,
        "dtype": str(dtype).removeprefix("torch."),
        "versions": versions(),
        "source": source or {},
        "model": {
            "scheduler_config": components.scheduler_config,
            "force_zeros_for_empty_prompt": components.force_zeros_for_empty_prompt,
            "is_random": components.is_random,
            "parameters": sum(p.numel() for m in components.modules().values() for p in m.parameters()),
        },
        "tokenizers": tokenizers,
        "components": entries,
    }
    write_manifest(out_dir, manifest)
    return manifest


def check_file(
    path: str,
    name: str,
    reference: nn.Module,
    gspec,
    checks: tuple[CheckShape, ...],
    device: torch.device,
    tolerance: float,
) -> list[dict]:
    """The file at `path` on a fresh ONNX Runtime session at every check shape; CheckpointError if one is out of
    tolerance (then no manifest is written)."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=providers_for(device))
    layers = getattr(getattr(reference, "clip", None), "config", None)
    records = []
    for i, shape in enumerate(checks):
        hidden_layer = layers.num_hidden_layers - i % 2 if layers is not None else 0  # last, then penultimate
        record = check_session(session, reference, gspec, shape, hidden_layer, tolerance)
        records.append(record)
        if not record["ok"]:
            raise CheckpointError(
                f"{path}: {name} on {record['providers'][0]} differs from the torch module at {record['shape']} by "
                f"{record['max_rel_error']} (max relative error), over the tolerance {tolerance:g}; no manifest "
                "was written"
            )
    return records


def export_model(
    path_or_preset: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    variant: str | None = None,
    allow_pickle: bool = False,
    tokenizer: str | None = None,
    vae: str | os.PathLike | None = None,
    **options,
) -> dict:
    """Open a diffusers folder, single file or preset (as Pipeline.from_pretrained does) and export it;
    `vae`: a VAE or TAESD checkpoint to export instead of the model's own. Options: export_components'."""
    from diffrt.assembly import open_model
    from diffrt.loading import load_model
    from diffrt.presets import PRESETS

    source = open_model(path_or_preset, variant=variant, allow_pickle=allow_pickle, tokenizer=tokenizer, seed=seed)
    components = source.components()
    record = source_record(path_or_preset, seed, is_preset=source.checkpoint is None and path_or_preset in PRESETS)
    if vae is not None:
        components.vae = load_model(vae, component=None)
        record["vae"] = source_record(vae, seed, is_preset=False)
    return export_components(components, out_dir, source=record, **options)


def export_cached(
    components: Components, dtype: torch.dtype, device: torch.device, cache_dir: str, opset: int = 18
) -> str:
    """A folder under `cache_dir` holding an export of exactly these modules in `dtype` (weights hashed, not file
    names trusted), exported now if it is missing or no longer matches its manifest."""
    record = {"version": VERSION, "opset": opset, "dtype": str(dtype),
              "weights": {n: weights_sha256(m) for n, m in component_modules(components).items()}}  # fmt: skip
    folder = os.path.join(cache_dir, hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32])
    try:
        open_export(folder)
        return folder
    except CheckpointError:  # absent, incomplete or changed: export (again)
        pass
    export_components(components, folder, dtype=dtype, opset=opset, device=device, source={"cache_key": record},
                      progress=sys.stderr.isatty())  # fmt: skip
    return folder
