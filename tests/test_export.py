"""ONNX export: every component of tiny SD1.x / SD2.x / SDXL configs, run by an ONNX Runtime session, matches our torch
module within 1e-4 (fp32) at several resolutions, batch sizes and sequence lengths from one file; names, dynamic axes
and opset; fp16 with the fragile ops in fp32; external data; TAESD; `diffrt export`."""

import os

import onnx
import onnxruntime as ort
import pytest
import torch

from diffrt.assembly import components_from_preset
from diffrt.cli import main
from diffrt.export.exported import open_export
from diffrt.export.exporter import export_components
from diffrt.export.graphs import graph_spec, sample_inputs
from diffrt.export.ort_check import DEFAULT_CHECKS, CheckShape
from diffrt.models.taesd import AutoencoderTiny, TAESDConfig
from tests.helpers.export_fixtures import exported
from tests.helpers.parity import max_rel_error

PRESETS = ("tiny-sd15", "tiny-sd21", "tiny-sdxl")
THIRD = CheckShape(3, 40, 24, 33)  # odd latent sides (5 x 3), a third batch and sequence length: not in the export


@pytest.fixture(scope="session")
def export_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("exports"))


def torch_outputs(name: str, module, inputs: dict) -> dict:
    """What our torch module's own API returns for the graph's inputs, by the graph's output names."""
    with torch.no_grad():
        if name.startswith("text_encoder"):
            layer = int(inputs["hidden_layer"])
            assert layer == module.config.num_hidden_layers, "compare at the last layer: normed = last_hidden_state"
            out = module(inputs["input_ids"].long(), hidden_layer=layer)
            return {"hidden_states": out.hidden_state, "normed_hidden_states": out.last_hidden_state,
                    "pooler_output": out.pooled}  # fmt: skip
        if name == "unet":
            extra = {k: inputs[k] for k in ("text_embeds", "time_ids", "timestep_cond") if k in inputs}
            return {"out_sample": module(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                                         **extra)}  # fmt: skip
        if name == "vae_decoder":
            return {"sample": module.decode(inputs["latent_sample"])}
        encoded = module.encode(inputs["sample"])
        return {"latent_parameters": torch.cat([encoded.mean, encoded.logvar], 1)} if isinstance(
            encoded, tuple) else {"latent_sample": encoded}  # fmt: skip


def modules_of(components) -> dict:
    return {"text_encoder": components.text_encoder, "text_encoder_2": components.text_encoder_2,
            "unet": components.unet, "vae_decoder": components.vae, "vae_encoder": components.vae}  # fmt: skip


@pytest.mark.parametrize("preset", PRESETS)
def test_every_component_matches_torch_from_one_file(export_root, preset):
    folder = exported(export_root, preset)
    model = open_export(folder)
    fresh = components_from_preset(preset, 0)  # the same seeded weights, built anew: nothing shared with the export
    expected = {"text_encoder", "unet", "vae_decoder", "vae_encoder"} | (
        {"text_encoder_2"} if "xl" in preset else set()
    )
    assert set(model.components) == expected
    for name in model.components:
        entry = model.manifest["components"][name]
        # The export's own check: two resolutions, batch sizes and sequence lengths, each within 1e-4.
        shapes = [c["shape"] for c in entry["checked"]]
        assert len({(s["batch"], s["height"], s["width"], s["sequence"]) for s in shapes}) == 2
        assert len({s["height"] for s in shapes}) == len({s["batch"] for s in shapes}) == 2
        assert len({s["sequence"] for s in shapes}) == 2
        assert all(c["ok"] and max(c["max_rel_error"].values()) <= 1e-4 for c in entry["checked"]), entry["checked"]
        # And independently: a fresh session on the same file, our module's own API, a third shape.
        module = modules_of(fresh)[name].eval()
        spec = graph_spec(name, module, torch.float32)
        layer = module.config.num_hidden_layers if name.startswith("text") else 0
        inputs = sample_inputs(spec, THIRD.axes, seed=7, hidden_layer=layer)
        session = ort.InferenceSession(model.model_path(name), providers=["CPUExecutionProvider"])
        outs = dict(zip([o.name for o in session.get_outputs()],
                        session.run(None, {k: v.numpy() for k, v in inputs.items()}), strict=True))  # fmt: skip
        for out_name, ref in torch_outputs(name, module, inputs).items():
            assert max_rel_error(torch.from_numpy(outs[out_name]), ref) <= 1e-4, f"{preset} {name} {out_name}"


def test_check_fails_when_the_file_differs_from_the_module(tmp_path, monkeypatch):
    """The export's check is a real comparison: a module changed after tracing is caught, and no manifest is
    written, so the folder cannot be opened."""
    from diffrt.export import exporter

    original = exporter.export_onnx

    def export_then_perturb(module, *args, **kwargs):
        files = original(module, *args, **kwargs)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.1)  # the torch reference now differs from the file
        return files

    monkeypatch.setattr(exporter, "export_onnx", export_then_perturb)
    with pytest.raises(ValueError, match="over the tolerance 0.0001; no manifest was written"):
        export_components(components_from_preset("tiny-sd15", 0), tmp_path, names=["vae_decoder"], progress=False)
    assert not os.path.exists(tmp_path / "manifest.json")
    with pytest.raises(ValueError, match="manifest 'manifest.json' is missing"):
        open_export(tmp_path)


def test_names_dynamic_axes_and_opset(export_root):
    folder = exported(export_root, "tiny-sdxl")

    def io(name):
        m = onnx.load(os.path.join(folder, f"{name}.onnx"), load_external_data=False)
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        return opset, {v.name: dims(v) for v in m.graph.input}, {v.name: dims(v) for v in m.graph.output}

    opset, ins, outs = io("unet")
    assert opset >= 18
    assert ins == {"sample": ["batch", 4, "height", "width"], "timestep": [],
                   "encoder_hidden_states": ["batch", "sequence", 72], "text_embeds": ["batch", 24],
                   "time_ids": ["batch", 6]}  # fmt: skip
    assert outs == {"out_sample": ["batch", 4, "height", "width"]}
    _, ins, outs = io("text_encoder_2")
    assert ins == {"input_ids": ["batch", "sequence"], "hidden_layer": []}
    assert outs == {"hidden_states": ["batch", "sequence", 40], "normed_hidden_states": ["batch", "sequence", 40],
                    "pooler_output": ["batch", 24]}  # fmt: skip
    _, ins, outs = io("vae_decoder")
    assert ins == {"latent_sample": ["batch", 4, "height", "width"]}
    assert outs == {"sample": ["batch", 3, "image_height", "image_width"]}
    _, ins, outs = io("vae_encoder")
    assert ins == {"sample": ["batch", 3, "image_height", "image_width"]}
    assert outs == {"latent_parameters": ["batch", 8, "height", "width"]}


def _fp32_ops(path: str) -> dict[str, set[str]]:
    """For Softmax, InstanceNormalization (torch's GroupNorm) and LayerNormalization: the element types of their
    data inputs, from the graph after shape inference."""
    m = onnx.shape_inference.infer_shapes(onnx.load(path))
    types = {v.name: v.type.tensor_type.elem_type for v in (*m.graph.value_info, *m.graph.input, *m.graph.output)}
    found: dict[str, set[str]] = {}
    for node in m.graph.node:
        if node.op_type in ("Softmax", "InstanceNormalization", "LayerNormalization"):
            found.setdefault(node.op_type, set()).add(onnx.TensorProto.DataType.Name(types[node.input[0]]))
    return found


def test_fp16_keeps_softmax_norms_and_the_sdxl_vae_in_fp32(export_root):
    folder = exported(export_root, "tiny-sdxl", torch.float16, names=["text_encoder_2", "unet", "vae_decoder"])
    model = open_export(folder)
    assert model.dtype("unet") == model.dtype("text_encoder_2") == "float16"
    assert model.dtype("vae_decoder") == "float32"  # the SDXL VAE overflows in fp16: exported in fp32
    for name in ("unet", "text_encoder_2"):
        ops = _fp32_ops(model.model_path(name))
        assert ops.get("Softmax") == {"FLOAT"}, (name, ops)
        assert set().union(*ops.values()) == {"FLOAT"}, (name, ops)
        assert "LayerNormalization" in ops or "InstanceNormalization" in ops
        graph = onnx.load(model.model_path(name), load_external_data=False).graph
        matrices = {
            onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer if sum(d > 1 for d in t.dims) > 1
        }
        assert matrices == {"FLOAT16"}, (name, matrices)  # the weights; norms' affine vectors were folded to fp32
    for name, entry in model.manifest["components"].items():  # run on ORT against fp32 torch maths, same weights
        worst = max(max(c["max_rel_error"].values()) for c in entry["checked"])
        assert worst <= (2e-2 if entry["dtype"] == "float16" else 1e-4), (name, worst)


def test_external_data_in_one_file_beside_the_model(tmp_path):
    components = components_from_preset("tiny-sd21", 0)
    manifest = export_components(components, tmp_path, names=["unet"], progress=False, external_data_above=0,
                                 checks=DEFAULT_CHECKS[:1])  # fmt: skip
    entry = manifest["components"]["unet"]
    assert [d["file"] for d in entry["external_data"]] == ["unet.onnx.data"]
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "tokenizer", "unet.onnx", "unet.onnx.data"]
    m = onnx.load(str(tmp_path / "unet.onnx"), load_external_data=False)
    locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"unet.onnx.data"}
    assert os.path.getsize(tmp_path / "unet.onnx") * 10 < os.path.getsize(tmp_path / "unet.onnx.data")
    assert entry["checked"][0]["ok"]
    open_export(tmp_path)  # and it verifies


def test_taesd_exports_and_matches(tmp_path):
    components = components_from_preset("tiny-sd15", 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        components.vae = AutoencoderTiny(TAESDConfig.preset("tiny")).eval()
    manifest = export_components(components, tmp_path, names=["vae_decoder", "vae_encoder"], progress=False)
    for name in ("vae_decoder", "vae_encoder"):
        entry = manifest["components"][name]
        assert entry["class"] == "AutoencoderTiny"
        assert all(max(c["max_rel_error"].values()) <= 1e-4 for c in entry["checked"])
    outputs = {o.name for o in ort.InferenceSession(str(tmp_path / "vae_encoder.onnx")).get_outputs()}
    assert outputs == {"latent_sample"}


def test_cli_export_writes_a_folder_and_reports(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "tiny-sd15", "-o", str(out), "--dtype", "fp32", "--components", "vae_decoder",
                 "--check-at", "1,32,48", "--device", "cpu"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "vae_decoder     vae_decoder.onnx" in printed and "at 1 shapes" in printed
    model = open_export(out)
    assert model.manifest["source"] == {"preset": "tiny-sd15", "seed": 0}
    assert model.manifest["components"]["vae_decoder"]["checked"][0]["shape"]["height"] == 32
    assert set(model.manifest["versions"]) == {"diffrt", "torch", "onnx", "onnxruntime", "python"}
    assert main(["export", "tiny-sd15", "-o", str(out), "--opset", "12"]) == 2
    assert "opset 12 is not supported; choose 18..20" in capsys.readouterr().err


def test_source_hash_of_a_checkpoint_folder(tmp_path):
    """A diffusers folder (the embedded default model) is recorded by its files' sha256."""
    from diffrt.cli_generate import DEFAULT_MODEL
    from diffrt.export.exporter import export_model
    from diffrt.export.files import sha256_file

    manifest = export_model(DEFAULT_MODEL, tmp_path, names=["vae_decoder"], checks=(), progress=False)
    files = manifest["source"]["files"]
    weights = "vae/diffusion_pytorch_model.safetensors"
    assert files[weights] == sha256_file(os.path.join(DEFAULT_MODEL, weights))
    assert {"model_index.json", "unet/config.json", "tokenizer/vocab.json"} <= set(files)
    assert manifest["components"]["vae_decoder"]["checked"] == []
