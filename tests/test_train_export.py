"""The exported folder (diffusers format, fp16) loads in diffrt's Pipeline and in diffusers' StableDiffusionPipeline
with the same pictures; `diffrt train` on the command line; benchmarks/adherence.py end to end on tiny weights."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import diffrt
from diffrt.cli import main
from diffrt.train.export import export_pipeline
from diffrt.train.recipes import ARCHITECTURES
from tests.helpers.parity import assert_parity
from tests.helpers.train_fixtures import finished_tiny_run

PROMPT = "a yellow circle to the left of a black star, white background"
ROOT = Path(__file__).resolve().parents[1]


def _read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("export")
    run = str(root / "run")
    finished_tiny_run(run)
    folders = {"run": run}
    for which in ("student", "teacher"):
        folders[which] = str(root / which)
        size = export_pipeline(run, folders[which], which, max_mb=30)
        assert 0 < size < 4 * 2**20
    return folders


def test_folder_layout_and_fp16_weights(exported):
    for which, scheduler in (("student", "LCMScheduler"), ("teacher", "DDIMScheduler")):
        folder = exported[which]
        index = _read_json(os.path.join(folder, "model_index.json"))
        assert index["scheduler"] == ["diffusers", scheduler] and index["_class_name"] == "StableDiffusionPipeline"
        for name, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                           ("text_encoder", "model")):  # fmt: skip
            with safe_open(os.path.join(folder, name, f"{file}.safetensors"), "pt") as f:
                dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (no __iter__)
            assert dtypes == {"F16"}, (name, dtypes)
        for name in ("vocab.json", "merges.txt"):
            assert os.path.isfile(os.path.join(folder, "tokenizer", name))
    unet = _read_json(os.path.join(exported["student"], "unet", "config.json"))
    assert unet["time_cond_proj_dim"] == 256


def test_default_architecture_fits_30_mb():
    """The shipped architecture's weights in fp16 (tokenizer vocabulary at its upper bound) stay under 30 MB."""
    from diffrt.models.clip import CLIPTextConfig, CLIPTextModel
    from diffrt.models.unet import UNet2DConditionModel, UNetConfig
    from diffrt.models.vae import AutoencoderKL, AutoencoderKLConfig

    arch = ARCHITECTURES["default"]
    with torch.device("meta"):
        unet = {**arch.unet, "time_cond_proj_dim": 256}
        models = [
            UNet2DConditionModel(UNetConfig.from_diffusers(unet)),
            AutoencoderKL(AutoencoderKLConfig.from_diffusers(arch.vae)),
            CLIPTextModel(CLIPTextConfig.from_transformers({**arch.text, "vocab_size": arch.tokenizer_vocab})),
        ]
    fp16_bytes = 2 * sum(p.numel() for m in models for p in m.parameters())
    assert fp16_bytes < 28 * 2**20, fp16_bytes / 2**20  # 2 MB left for configs and the tokenizer


@pytest.mark.parametrize("which,sampler,steps", [("student", "lcm", 2), ("teacher", "ddim", 3)])
def test_loads_in_diffrt_and_diffusers_with_the_same_picture(exported, which, sampler, steps):
    from diffusers import StableDiffusionPipeline

    ours = diffrt.Pipeline.from_pretrained(exported[which])
    assert ours.default_sampler() == sampler and not ours.components.is_random
    theirs = StableDiffusionPipeline.from_pretrained(exported[which], dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    side = ARCHITECTURES["tiny"].image_size
    latents = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    kw = {"guidance_scale": 6.0, "latents": latents, "output_type": "np"}
    expected = theirs(PROMPT, num_inference_steps=steps, height=side, width=side,
                      generator=torch.Generator().manual_seed(1), **kw).images  # fmt: skip
    actual = ours(PROMPT, steps=steps, generator=torch.Generator().manual_seed(1), **kw)
    assert actual.shape == expected.shape == (1, side, side, 3)
    assert_parity(torch.from_numpy(actual), torch.from_numpy(expected), tol=1e-4)


def test_cli_trains_resumes_refuses_and_exports(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["train", "vae", run, "--preset", "tiny", "--steps", "2", "--batch", "4", "--device", "cpu"]
    assert main([*args, "--max-minutes", "0"]) == 0
    assert "step 1/2 paused" in capsys.readouterr().out
    assert main(args) == 0
    assert "resuming" in capsys.readouterr().out
    assert main([*args, "--lr", "0.1"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["train", "unet", run, "--steps", "2"]) == 2
    assert "stage 'text'" in capsys.readouterr().err  # the vae is finished, the text stage never ran
    assert main(["train", "export", run, str(tmp_path / "out")]) == 2
    assert "finish `diffrt train" in capsys.readouterr().err


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("adherence", ROOT / "benchmarks" / "adherence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adherence_benchmark_runs_end_to_end(exported, tmp_path):
    """On random-ish tiny weights: the report's structure and counts, not its figures (no adherence claim)."""
    bench = _load_benchmark()
    out_json, out_png = tmp_path / "a.json", tmp_path / "a.png"
    report = bench.main(
        [
            "--teacher",
            exported["teacher"],
            "--student",
            exported["student"],
            "--prompts",
            "4",
            "--held-out-share",
            "0.5",
            "--teacher-steps",
            "2",
            "--judge-eval",
            "20",
            "--batch",
            "3",
            "--device",
            "cpu",
            "--commit",
            "abc1234",
            "--json",
            str(out_json),
            "--grid",
            str(out_png),
        ]
    )
    assert _read_json(out_json) == json.loads(json.dumps(report))
    assert report["prompts"]["count"] == 4 and report["prompts"]["held_out"] == 2
    assert list(report["samplers"]) == ["teacher ddim-2", "lcm-1", "lcm-2", "lcm-4"]
    for r in report["samplers"].values():
        assert 0 <= r["adherence"] <= 1 and set(r["per_head"]) == {"layout", "size", "color1", "shape1", "color2",
                                                                    "shape2", "background"}  # fmt: skip
        assert r["adherence_held_out"] is not None and r["images_per_second"] > 0
        assert r["gpu"] == "none (cpu)" and r["torch"] == torch.__version__ and r["commit"] == "abc1234"
    assert 0.9 <= report["judge"]["accuracy_all"] <= 1
    grid = Image.open(out_png)
    assert grid.height == 16 + 4 * 2 * 64 and np.asarray(grid).std() > 0  # rows of 2x reference-sized tiles


def test_benchmark_prompts_include_held_out_pairs():
    bench = _load_benchmark()
    prompts = bench.prompts(500, 0.2)
    assert len(prompts) == 500 and sum(p["held_out"] for p in prompts) == 100
    from diffrt.train.shapes import is_held_out, parse_caption

    assert all(is_held_out(parse_caption(p["caption"])) == p["held_out"] for p in prompts)
    assert len({p["caption"] for p in prompts}) > 400
