"""TensorRT optimization profiles: the image shapes an engine serves, and what they mean for each component's inputs.

A profile is given in images (batch = images per call, height and width in pixels), as a user thinks of a request;
each component's inputs follow: latents are 1/8 of the pixels, the UNet sees twice the batch under classifier-free
guidance (`cfg`, the conditional and unconditional halves in one batch), text runs at 77 tokens. Static profiles
(min = opt = max) build the fastest engines and allow CUDA-graph capture (the TensorRT demo's default); a dynamic
one serves a range from one engine.
"""

from dataclasses import dataclass

from diffrt.export.graphs import VAE_SCALE, GraphSpec

Shape = tuple[int, int, int]  # batch, height, width (pixels)
SEQUENCE = 77


@dataclass(frozen=True)
class Profile:
    min: Shape
    opt: Shape
    max: Shape
    cfg: bool = True  # the UNet's batch is 2x the images' (guidance on); False for guidance-free models (Turbo, LCM)

    def __post_init__(self):
        for name, (b, h, w) in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            if b < 1 or h < VAE_SCALE or w < VAE_SCALE or h % VAE_SCALE or w % VAE_SCALE:
                raise ValueError(
                    f"profile {name} {b},{h},{w}: batch >= 1 and height, width positive multiples of {VAE_SCALE}"
                )
        if not all(lo <= mid <= hi for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True)):
            raise ValueError(f"profile min {self.min} <= opt {self.opt} <= max {self.max} must hold per dimension")

    @classmethod
    def static(cls, shape: Shape, cfg: bool = True) -> "Profile":
        return cls(shape, shape, shape, cfg)

    @property
    def is_static(self) -> bool:
        return self.min == self.max

    @staticmethod
    def parse(text: str) -> Shape:
        """Read "B,H,W" as (B, H, W)."""
        try:
            b, h, w = (int(v) for v in text.split(","))
        except ValueError as e:
            raise ValueError(f"profile shape {text!r}: write BATCH,HEIGHT,WIDTH in pixels, e.g. 1,512,512") from e
        return b, h, w

    def as_json(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max), "cfg": self.cfg}

    def input_shapes(self, component: str, spec: GraphSpec) -> dict[str, list[list[int]]]:
        """{input: [min, opt, max]} for every input of `component` with a dynamic axis."""
        shapes = {}
        for t in spec.inputs:
            if not any(isinstance(d, str) for d in t.dims):
                continue
            shapes[t.name] = [list(self._dims(component, t.dims, which)) for which in ("min", "opt", "max")]
        return shapes

    def _dims(self, component: str, dims: tuple, which: str) -> tuple[int, ...]:
        b, h, w = getattr(self, which)
        if component == "unet" and self.cfg and not (which == "min" and not self.is_static):
            b *= 2  # a dynamic profile's min keeps one image without guidance
        axes = {"batch": b, "sequence": SEQUENCE, "height": h // VAE_SCALE, "width": w // VAE_SCALE,
                "image_height": h, "image_width": w}  # fmt: skip
        return tuple(axes[d] if isinstance(d, str) else d for d in dims)


DYNAMIC_256_1024 = Profile((1, 256, 256), (1, 512, 512), (4, 1024, 1024))
STATIC_512 = Profile.static((1, 512, 512))
