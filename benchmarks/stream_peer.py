"""StreamDiffusion 0.1.1 (cumulo-autumn/StreamDiffusion, PyPI; its torch path, no TensorRT) on the same random
weights as a diffrt pipeline: diffusers' StableDiffusionPipeline holding our weights (benchmarks/peers), TAESD
swapped in as its own wrapper does (`stream.vae = AutoencoderTiny(...)`). Frames in and pictures out the way
diffrt.Stream takes and gives them (uint8 [H, W, 3] on the host), so both do the same work per frame."""

import numpy as np
import torch

from benchmarks import peers


class StreamDiffusionPeer:
    def __init__(self, diffusers_pipe, taesd: torch.nn.Module | None, steps: tuple[int, ...], mode: str,
                 guidance: str, stream_batch: bool, size: int, prompt: str,
                 similarity: float | None = None) -> None:  # fmt: skip
        from streamdiffusion import StreamDiffusion

        self.mode = mode
        self.stream = StreamDiffusion(diffusers_pipe, t_index_list=list(steps), torch_dtype=torch.float16,
                                      width=size, height=size, use_denoising_batch=stream_batch,
                                      cfg_type=guidance)  # fmt: skip
        if taesd is not None:
            self.stream.vae = peers.diffusers_vae(taesd).to(device="cuda", dtype=torch.float16)
        # StreamDiffusion's defaults: 50 steps, guidance 1.2 with its CFG modes (it forces 1.0 for "none").
        self.stream.prepare(prompt, num_inference_steps=50, guidance_scale=1.2)
        if similarity is not None:  # its filter sleeps through a skipped frame for its mean frame time (paced output)
            self.stream.enable_similar_image_filter(similarity, max_skip_frame=10)

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.mode == "img2img":
            pixels = torch.from_numpy(frame).to("cuda", non_blocking=True)
            image = self.stream(pixels.permute(2, 0, 1)[None].half() / 255)  # its preprocess maps [0, 1] to [-1, 1]
        else:
            image = self.stream.txt2img()
        picture = ((image[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        return picture.cpu().numpy()
