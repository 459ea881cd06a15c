"""`diffrt info`: what it prints for a single file and a pipeline folder, and its exit codes for refused pickles and
NaN weights."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffrt.cli import main
from tests.helpers.loading_fixtures import make_pipeline, write_single_file


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ref = make_pipeline("sd1", str(root / "pipe"))
    write_single_file("sd1", ref, str(root / "model.safetensors"))
    counts = {name: sum(p.numel() for p in m.parameters()) for name, (m, _) in ref.items()}
    return str(root), counts


def _info(capsys, *args) -> tuple[int, str, str]:
    code = main(["info", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_single_file(sd1, capsys):
    root, counts = sd1
    code, out, _ = _info(capsys, os.path.join(root, "model.safetensors"))
    assert code == 0
    assert "model.safetensors: single file, SD1.x" in out
    assert "text encoder cond_stage_model.transformer.* is OpenAI CLIP" in out  # why it is SD1
    assert "proj_in is a 1x1 conv" in out and "prediction_type epsilon" in out
    for name, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"), ("text_encoder", "CLIPTextModel")):
        line = next(x for x in out.splitlines() if x.strip().startswith(name + " "))
        assert cls in line and f"{counts[name]:,} params" in line and "float32" in line, line
    assert f"total: {sum(counts.values()):,} parameters" in out
    assert "ignored: 2 training-only key(s) (alphas_cumprod, model_ema.decay)" in out


def test_info_json_and_dtypes(sd1, capsys, tmp_path):
    root, counts = sd1
    sd = load_file(os.path.join(root, "model.safetensors"))
    half = {k: (v.half() if k.startswith("model.") else v) for k, v in sd.items()}
    save_file(half, tmp_path / "half.safetensors")
    code, out, _ = _info(capsys, tmp_path / "half.safetensors", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["family"] == "sd1" and summary["kind"] == "single file"
    assert summary["components"]["unet"]["dtypes"] == {"float16": summary["components"]["unet"]["tensors"]}
    assert summary["components"]["vae"]["dtypes"] == {"float32": summary["components"]["vae"]["tensors"]}
    assert {n: c["parameters"] for n, c in summary["components"].items()} == counts


def test_info_pipeline_folder(sd1, capsys):
    root, counts = sd1
    code, out, _ = _info(capsys, os.path.join(root, "pipe"))
    assert code == 0 and "pipe: pipeline folder, SD1.x" in out
    assert "unet config: conv projections" in out and "scheduler/scheduler_config.json" in out
    assert f"total: {sum(counts.values()):,} parameters" in out


def test_info_refuses_pickles_unless_asked(sd1, capsys, tmp_path):
    root, _ = sd1
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(os.path.join(root, "model.safetensors"))}, path)
    code, out, err = _info(capsys, path)
    assert code == 2 and out == ""
    assert "diffrt info: error:" in err and "refusing to load a pickle" in err and "--allow-pickle" in err
    code, out, _ = _info(capsys, path, "--allow-pickle")
    assert code == 0 and "single file, SD1.x" in out


def test_info_check_finite(sd1, capsys, tmp_path):
    root, _ = sd1
    sd = load_file(os.path.join(root, "model.safetensors"))
    sd["first_stage_model.decoder.conv_out.bias"][1] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    code, out, _ = _info(capsys, tmp_path / "nan.safetensors")
    assert code == 0 and "NaN/Inf" not in out  # headers only, unless asked
    code, out, _ = _info(capsys, tmp_path / "nan.safetensors", "--check-finite")
    assert code == 1 and "NaN/Inf: decoder.conv_out.bias (1 NaN, 0 Inf)" in out
    assert out.count("NaN/Inf: none") == 2  # unet and text encoder are clean


def test_info_bad_file(capsys, tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    code, _, err = _info(capsys, tmp_path / "x.safetensors")
    assert code == 2 and "bad header length 16" in err


def test_console_script(sd1):
    root, _ = sd1
    cmd = [shutil.which("diffrt")] if shutil.which("diffrt") else [sys.executable, "-m", "diffrt.cli"]
    path = os.path.join(root, "model.safetensors")
    out = subprocess.run([*cmd, "info", path], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "single file, SD1.x" in out.stdout
