"""The peers a user would otherwise pick, on the same random weights as a diffrt pipeline: diffusers' pipelines,
eager (SDPA) and with `torch.compile(mode="reduce-overhead")` on the UNet and the VAE decode (diffusers' speed guide;
cudnn.benchmark on). Their end-to-end timing is the same as diffrt's (diffrt.latency): prompt to image tensor on the
GPU, text encoder included, median of repeats after warm-up calls; the first call's time is the compile time (a cold
one only where the rows' inductor_cache_at_start says "cold")."""

import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.diffusers_configs import SD15, SD21, SDXL
from diffrt.clip_bpe import write_clip_bpe
from diffrt.latency import PROMPT, RUNS, quantiles
from diffrt.pipeline import Pipeline

UNET_CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}
# diffusers' scheduler for each of diffrt's samplers that the runs use, with the config overrides that make it ours.
SCHEDULERS = {
    "turbo": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "lcm": ("LCMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def _text_encoder(ours: torch.nn.Module):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    fields = dataclasses.asdict(ours.config)
    projection = fields.pop("projection_dim")
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = cls(CLIPTextConfig(**fields, projection_dim=projection or fields["hidden_size"]))
    wanted = set(model.state_dict())
    state = {k if k in wanted else k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}
    model.load_state_dict(state)
    return model


def diffusers_vae(ours: torch.nn.Module):
    """diffusers' AutoencoderKL or AutoencoderTiny holding a copy of our VAE's (or TAESD's) weights."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    c = ours.config
    if hasattr(c, "decoder_block_out_channels"):
        vae = AutoencoderTiny(encoder_block_out_channels=c.encoder_block_out_channels,
                              decoder_block_out_channels=c.decoder_block_out_channels,
                              num_encoder_blocks=c.num_encoder_blocks, num_decoder_blocks=c.num_decoder_blocks,
                              latent_channels=c.latent_channels)  # fmt: skip
    else:
        n = len(c.block_out_channels)
        vae = AutoencoderKL(block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
                            latent_channels=c.latent_channels, norm_num_groups=c.norm_num_groups,
                            down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                            scaling_factor=c.scaling_factor, force_upcast=c.force_upcast)  # fmt: skip
    vae.load_state_dict(ours.state_dict())
    return vae


def diffusers_pipeline(ours: Pipeline, arch: str, vae_upcast: bool = True):
    """diffusers' StableDiffusion(XL)Pipeline holding a copy of `ours`' weights, on its device and in its dtype.

    vae_upcast=False clears the VAE's force_upcast, as SDXL users who swap in an fp16-safe VAE run it: diffusers'
    SDXL pipeline otherwise moves the whole VAE to fp32 and back around every decode."""
    import diffusers
    from transformers import CLIPTokenizer

    c = ours.components
    with ours.device:  # random init where the weights go (fast on a GPU), then our weights
        unet = diffusers.UNet2DConditionModel(**UNET_CONFIGS[arch])
        unet.load_state_dict(c.unet.state_dict())
        vae = diffusers_vae(c.vae)
        encoders = [_text_encoder(e) if e is not None else None for e in (c.text_encoder, c.text_encoder_2)]
    folder = tempfile.mkdtemp(prefix="diffrt-peer-tokenizer-")
    write_clip_bpe(folder, ["a"], vocab_size=514)  # diffrt presets' byte-level vocabulary
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(c.scheduler_config)
    kwargs = {"vae": vae, "text_encoder": encoders[0], "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}
    if arch == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(**kwargs, text_encoder_2=encoders[1], tokenizer_2=tokenizer)
    else:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = diffusers.StableDiffusionPipeline(**kwargs)
    # fp16 throughout: with force_upcast (SDXL's VAE config) diffusers' SDXL pipeline upcasts its VAE to fp32 around
    # each decode itself (diffrt decodes it in bf16); the peer's components time its decode in fp16 either way.
    if not vae_upcast:
        pipe.vae.register_to_config(force_upcast=False)
    pipe = pipe.to(device=ours.device, dtype=ours.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compile_pipeline(pipe) -> None:
    """torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False) on the UNet and the VAE decode,
    cudnn.benchmark on.

    dynamic=False: by default (dynamic=None) the second shape a compiled module sees is recompiled with symbolic
    sizes, so in a call that measured 512² first, the peer's 1024² ran kernels made for any size. A user who serves
    one size compiles it static; each size here gets its own static graph, as it would in that user's process."""
    torch.backends.cudnn.benchmark = True
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True, dynamic=False)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode="reduce-overhead", fullgraph=True, dynamic=False)


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process: a row's difference says whether its calls recompiled."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def inductor_cache() -> str:
    """Whether torch.compile's on-disk cache already holds entries: "warm" (an earlier process on this machine
    compiled into it, so a first call is no cold compile) or "cold"."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # an older torch
        from torch._inductor.runtime.runtime_utils import cache_dir
    path = Path(cache_dir())
    return "warm" if path.is_dir() and any(path.iterdir()) else "cold"


def use_scheduler(pipe, sampler: str) -> None:
    import diffusers

    name, overrides = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)


def end_to_end(pipe, run: str, batch: int, height: int, width: int, repeats: int = 15, warmup: int = 2) -> dict:
    """Wall time of pipe(prompt) to an image tensor on the GPU; `first_call_s` includes any compilation."""
    sampler, steps, guidance = RUNS[run]
    use_scheduler(pipe, sampler)
    kw = {"num_inference_steps": steps, "guidance_scale": guidance, "height": height, "width": width,
          "num_images_per_prompt": batch, "output_type": "pt"}  # fmt: skip
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe(PROMPT, **kw)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(warmup - 1):
            pipe(PROMPT, **kw)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pipe(PROMPT, **kw)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
    return {**quantiles(times), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "first_call_s": first}


def components(pipe, batch: int, height: int, width: int, cfg: bool, repeats: int = 30) -> dict[str, dict]:
    """The peer's text encoder, UNet step and VAE decode, each timed with CUDA events over calls after warm-up."""
    device, dtype = pipe.device, pipe.unet.dtype
    unet_batch = 2 * batch if cfg else batch
    # Every input made under inference_mode, as the pipeline makes its latents: a tensor made outside it has another
    # dispatch key set, a guard of the compiled UNet, and recompiled it (NOTES_latency.md run 16's log).
    with torch.inference_mode():
        x = torch.randn(unet_batch, 4, height // 8, width // 8, device=device, dtype=dtype)
        t = torch.tensor(999.0, device=device)
        added = None
        if not hasattr(pipe, "text_encoder_2"):
            embeds = pipe.encode_prompt(PROMPT, device, unet_batch, False)[0]
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, None, device, unet_batch, False)
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * unet_batch, device=device, dtype=dtype)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        z = torch.randn(batch, 4, height // 8, width // 8, device=device, dtype=pipe.vae.dtype)
        decode_kw = {} if hasattr(pipe, "text_encoder_2") else {"generator": None}
        calls = {
            "text_encoder": lambda: (
                pipe.encode_prompt(PROMPT, device, batch, False)
                if added is None
                else pipe.encode_prompt(PROMPT, None, device, batch, False)
            ),
            # the arguments the pipeline passes, meant to replay its runs' compiled graphs (another return_dict would
            # be a new guard and a recompile)
            "unet_step": lambda: pipe.unet(
                x,
                t,
                encoder_hidden_states=embeds,
                timestep_cond=None,
                cross_attention_kwargs=None,
                added_cond_kwargs=added,
                return_dict=False,
            ),
            # the keywords of the pipeline's own call: SD's passes a generator, SDXL's does not (the count of keywords
            # is a guard, so the other spelling recompiled the decoder)
            "decode": lambda: pipe.vae.decode(z / pipe.vae.config.scaling_factor, return_dict=False, **decode_kw),
        }
        return {name: event_times(fn, repeats) for name, fn in calls.items()}


def event_times(fn, repeats: int) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return quantiles([s.elapsed_time(e) for s, e in events])
