"""The training stages at the "tiny" architecture on CPU: each runs, learns, and resumes exactly."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from diffrt.models.embeddings import guidance_scale_embedding
from diffrt.train import checkpoint as ck
from diffrt.train import lcm, text, unet, vae
from diffrt.train.recipes import ARCHITECTURES, init_run, stage_settings
from tests.helpers.train_fixtures import TINY, TRAIN, finished_tiny_run, run_stage, settings

UPSTREAM = {"vae": (), "text": (), "unet": ("vae", "text", "tokenizer"), "lcm": ("vae", "unet", "tokenizer")}


def _read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def new_run(folder: str, finished: str, stage: str) -> str:
    """A tiny run whose upstream stages of `stage` are those of the finished run (linked, read only)."""
    init_run(folder, "tiny")
    for name in UPSTREAM[stage]:
        os.symlink(os.path.join(finished, name), os.path.join(folder, name))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A tiny run with every stage finished (a few steps each)."""
    folder = str(tmp_path_factory.mktemp("run"))
    for stage, result in zip(TRAIN, finished_tiny_run(folder), strict=True):
        assert result["done"] and result["step"] == TINY[stage]["steps"]
        for _, metrics in result["history"]:
            assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), (stage, metrics)
    return folder


def test_every_stage_leaves_a_checkpoint_and_its_product(run):
    for stage, product in (("vae", "model"), ("text", "model"), ("unet", "model"), ("unet", "text_model"),
                           ("lcm", "model")):  # fmt: skip
        folder = os.path.join(run, stage)
        state = ck.read_state(folder)
        assert state["step"] == TINY[stage]["steps"]
        assert [f for f in os.listdir(folder) if f.startswith("ckpt-")] == [state["checkpoint"]]
        assert os.path.isfile(os.path.join(folder, product, "config.json"))
    with open(os.path.join(run, "vae", "model", "config.json")) as f:
        scaling = json.load(f)["scaling_factor"]
    assert 0.05 < scaling < 50 and scaling != 0.18215  # measured, not the default
    with open(os.path.join(run, "lcm", "model", "config.json")) as f:
        assert json.load(f)["time_cond_proj_dim"] == 256
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(run, "tokenizer", name))


def test_tokenizer_files_read_by_ours_and_transformers(run):
    from transformers import CLIPTokenizer as HFTokenizer

    from diffrt.tokenizer import CLIPTokenizer
    from diffrt.train import shapes

    folder = os.path.join(run, "tokenizer")
    ours, theirs = CLIPTokenizer.from_pretrained(folder), HFTokenizer.from_pretrained(folder)
    captions = [shapes.sample(s, 16, "all").caption for s in range(30)] + [""]
    expected = theirs(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours(captions), expected)
    words = ours.tokenize("a large yellow star on the left, purple background")
    assert len(words) == 10  # the BPE learned whole words (and the comma)
    assert ours.vocab_size <= ARCHITECTURES["tiny"].tokenizer_vocab


def test_lcm_student_starts_as_the_teacher(run):
    """Zero cond_proj: at any w the student's output is the teacher's, so distillation starts from the teacher."""
    from diffrt.loading import load_model

    teacher = load_model(os.path.join(run, "unet", "model"))
    config = _read_json(os.path.join(run, "unet", "model", "config.json"))
    student, student_config = lcm.student_unet(teacher, config)
    assert student_config["time_cond_proj_dim"] == 256
    x, t, ctx = torch.randn(2, 4, 4, 4), torch.tensor([999, 19]), torch.randn(2, 77, 32)
    w = guidance_scale_embedding(torch.tensor([3.0, 7.0]), 256)
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, ctx, timestep_cond=w), teacher(x, t, ctx), rtol=0, atol=0)


def test_lcm_helpers_match_the_pipeline_and_scheduler():
    from diffusers import LatentConsistencyModelPipeline

    from diffrt.models.embeddings import guidance_scale_embedding

    w = torch.tensor([6.5, 6.5])  # the one embedding the trainer and the pipeline use, held to diffusers'
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, 256)
    torch.testing.assert_close(guidance_scale_embedding(w, 256), expected)
    starts, prevs = lcm.ddim_schedule(50)
    assert starts[:3].tolist() == [19, 39, 59] and starts[-1] == 999 and prevs[:3].tolist() == [0, 19, 39]
    c_skip, c_out = lcm.boundary_scalings(torch.tensor([0, 999]))
    assert c_skip.flatten().tolist()[0] == 1.0 and c_out.flatten().tolist()[0] == 0.0
    assert c_skip.flatten()[1] < 1e-5 and abs(c_out.flatten()[1] - 1) < 1e-5


def _overfit(loss_fn, params, steps: int = 20, lr: float = 3e-3) -> list[float]:
    """Adam on one fixed batch with fixed noise: the loss of a stage on a problem it can solve."""
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _fixed_batch(n: int = 8):
    from diffrt.train.data import StepBatches, to_model_input

    images, captions, labels = StepBatches(seed=5, batch=n, size=ARCHITECTURES["tiny"].image_size)[0]
    return to_model_input(images, "cpu"), captions, labels


@pytest.mark.parametrize("stage", ["vae", "text", "unet"])
def test_loss_decreases_on_a_tiny_problem(run, stage):
    """Each stage's loss, 20 Adam steps on one batch (8 images / captions) from a fresh model: it falls by half."""
    from diffrt.loading import load_model
    from diffrt.models.unet import UNet2DConditionModel, UNetConfig
    from diffrt.models.vae import AutoencoderKL, AutoencoderKLConfig
    from diffrt.schedules import SchedulerConfig, alphas_cumprod
    from diffrt.tokenizer import CLIPTokenizer
    from diffrt.train.recipes import NOISE_SCHEDULE

    torch.manual_seed(0)
    arch = ARCHITECTURES["tiny"]
    x, captions, labels = _fixed_batch()
    tok = CLIPTokenizer.from_pretrained(os.path.join(run, "tokenizer"))
    if stage == "vae":
        model = AutoencoderKL(AutoencoderKLConfig.from_diffusers(arch.vae))
        s = settings("vae")
        losses = _overfit(lambda g: vae.vae_loss(model, x, s, g)[0], model.parameters())
    elif stage == "text":
        config = _read_json(os.path.join(run, "text", "model", "config.json"))
        from diffrt.models.clip import CLIPTextConfig, CLIPTextModel

        model = CLIPTextModel(CLIPTextConfig.from_transformers(config))
        heads = text.LabelHeads(model.config.hidden_size)
        ids = tok(captions)
        losses = _overfit(lambda g: heads.loss(model(ids).pooled, labels)[0],
                          [*model.parameters(), *heads.parameters()])  # fmt: skip
    else:
        with torch.no_grad():
            z = load_model(os.path.join(run, "vae", "model")).encode(x).mean
            context = load_model(os.path.join(run, "text", "model"))(tok(captions)).last_hidden_state
        model = UNet2DConditionModel(UNetConfig.from_diffusers(arch.unet))
        ac = alphas_cumprod(SchedulerConfig(**NOISE_SCHEDULE))
        losses = _overfit(lambda g: unet.diffusion_loss(model, z, context, ac, g, "fp32"), model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


def _all_tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, ck.read_state(folder)["checkpoint"]))


@pytest.mark.parametrize("stage", ["vae", "text", "unet", "lcm"])
def test_resume_equals_uninterrupted(tmp_path, run, stage):
    """Stopped after every step (max_seconds=0) and resumed, a run ends bit-identical to one that ran straight:
    weights, EMA copies and optimizer moments."""
    folders = {name: new_run(str(tmp_path / name), run, stage) for name in ("straight", "resumed")}
    straight = run_stage(folders["straight"], stage)
    calls = 0
    while not run_stage(folders["resumed"], stage, max_seconds=0)["done"]:
        calls += 1
    assert calls == TINY[stage]["steps"] - 1 and straight["done"]
    a, b = _all_tensors(os.path.join(folders["straight"], stage)), _all_tensors(os.path.join(folders["resumed"], stage))
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_with_other_settings_is_refused_but_more_steps_continue(tmp_path, run):
    with pytest.raises(ValueError, match="other settings"):
        run_stage(run, "vae", lr=5e-4)
    folder = new_run(str(tmp_path / "r"), run, "text")
    assert run_stage(folder, "text", steps=2)["done"]
    longer = run_stage(folder, "text", steps=4)
    assert longer["done"] and [i for i, _ in longer["history"]] == [2, 3]
    assert ck.read_state(os.path.join(folder, "text"))["settings"]["steps"] == 4


def test_a_stage_ends_at_the_step_it_reached(tmp_path, run):
    """What the device calls did: a time-boxed stage stops early, then --steps = the step reached finishes it (its
    model is exported and downstream stages accept it) without training further."""
    folder = new_run(str(tmp_path / "r"), run, "vae")
    assert not run_stage(folder, "vae", max_seconds=0)["done"]  # one step of three
    ended = run_stage(folder, "vae", steps=1)
    assert ended["done"] and ended["history"] == [] and ck.finished_stage(folder, "vae")
    assert ck.read_state(os.path.join(folder, "vae"))["step"] == 1
    assert os.path.isfile(os.path.join(folder, "vae", "model", "config.json"))


def test_caption_ids_equal_the_tokenizer(run):
    from diffrt.tokenizer import CLIPTokenizer
    from diffrt.train.data import CaptionIds

    tok = CLIPTokenizer.from_pretrained(os.path.join(run, "tokenizer"))
    captions = ["a red circle on the left, blue background", "", "a red circle on the left, blue background", "x y"]
    cached = CaptionIds(tok)
    assert torch.equal(cached(captions[:2]), tok(captions[:2]))
    assert torch.equal(cached(captions), tok(captions))  # from the cache and new ones, in order
    assert len(cached.rows) == 3


def test_unfinished_upstream_is_refused(tmp_path):
    folder = str(tmp_path / "r")
    init_run(folder, "tiny")
    run_stage(folder, "vae", max_seconds=0)  # one step of three
    with pytest.raises(ValueError, match="stage 'vae' .* not finished"):
        run_stage(folder, "unet")
    with pytest.raises(ValueError, match="another architecture"):
        init_run(folder, "default")


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="no setting 'kl_wieght'"):
        stage_settings("vae", kl_wieght=1.0)
