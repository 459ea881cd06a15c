"""LoRAs fused into a pipeline's weights in place, several at once with their own scales, and taken out again.

Fusing costs nothing per step: W = W0 + sum_i scale_i * (alpha_i / r_i) * up_i @ down_i is computed in float32 from
the original W0 and copied into the existing parameter (`copy_`), so the tensor a captured CUDA graph reads stays the
same one and the next replay uses the new weights. Every change recomputes from W0 (no drift from adding and
subtracting); when the last LoRA on a layer goes, W0 is copied back bit for bit. The caller clears the prompt cache
when a text encoder's weights change (the changed components are returned).

Where the work happens: a LoRA's factors move to the weights' device once, when it is added, in float32. W0 of every
layer a LoRA touches is kept beside the weights: on a GPU when it has room for it (then a switch is three kernel
launches per layer, tens of milliseconds for a LoRA on every layer of a UNet, instead of seconds of CPU matmuls and
host-to-device copies), else pinned on the CPU.
"""

import re
import threading
from dataclasses import dataclass

import torch
from torch import nn

from diffrt.loading.errors import CheckpointError
from diffrt.loading.lora import LoRAFile, LoRALayer, adaptable_modules, ldm_unet_names
from diffrt.loading.single_file import CONTEXT_DIM, FAMILY_NAMES

Key = tuple[str, str]  # (component, module name)
CONTIGUOUS = torch.contiguous_format
_TEXT_WIDTH = {768: "SD1.x or SDXL's first", 1024: "SD2.x", 1280: "SDXL's second"}


@dataclass
class LoadedLoRA:
    path: str
    layers: dict[Key, LoRALayer]  # on the weights' device, float32
    scale: float


def match_lora(lora: LoRAFile, models: dict[str, nn.Module]) -> dict[Key, LoRALayer]:
    """The file's pairs keyed by the model's own modules; CheckpointError naming the family it is for when that is not
    the model's, the keys that match no layer, and every shape that does not fit."""
    unet = models["unet"]
    family = unet.config.family
    verdict = lora_family(lora)
    if verdict and verdict[0] != family:
        raise CheckpointError(
            f"{lora.path}: this LoRA is for {FAMILY_NAMES[verdict[0]]} ({verdict[1]}); the model is "
            f"{FAMILY_NAMES[family]}"
        )
    matched, unknown, misfit = {}, [], []
    for component, layers in lora.layers.items():
        model = models.get(component)
        if model is None:
            have = ", ".join(sorted(models))
            raise CheckpointError(f"{lora.path}: the LoRA adapts {component}, which this model lacks (it has {have})")
        targets = adaptable_modules(model)
        lookup = _lookup(targets, model if component == "unet" else None) if lora.layout == "kohya" else {}
        for name, layer in layers.items():
            module = lookup.get(name) if lora.layout == "kohya" else _plain_name(name, targets)
            if module is None:
                unknown.append(f"{layer.key} ({component})")
                continue
            weight = targets[module].weight
            want = (weight.shape[0], *weight.shape[1:])
            got = (layer.up.shape[0], *layer.down.shape[1:])
            if layer.down.ndim != weight.ndim or got != want:
                misfit.append(f"{component}.{module}: LoRA up x down gives {list(got)}, the layer's weight is "
                              f"{list(want)} (rank {layer.rank}, {layer.key})")  # fmt: skip
                continue
            matched[(component, module)] = layer
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} LoRA key(s) match no layer of the model: {_names(unknown)}")
    if misfit:
        problems.append(f"{len(misfit)} shape mismatch(es): {_names(misfit, 4)}")
    if problems:
        guess = f"; it looks like a {FAMILY_NAMES[verdict[0]]} LoRA ({verdict[1]})" if verdict else ""
        raise CheckpointError(
            f"{lora.path} ({lora.layout} layout) does not fit this {FAMILY_NAMES[family]} model: "
            + "; ".join(problems)
            + guess
        )
    return matched


def lora_family(lora: LoRAFile) -> tuple[str, str] | None:
    """(family, reason) where the file tells: a second text encoder is SDXL's; else the UNet's cross-attention width
    at the families' full sizes (768 SD1, 1024 SD2, 2048 SDXL)."""
    if "text_encoder_2" in lora.layers:
        return "sdxl", "it adapts a second text encoder (lora_te2_ / text_encoder_2)"
    for name, layer in lora.layers.get("unet", {}).items():
        if re.search(r"attn2[._]to_[kv]$", name) and layer.down.ndim == 2:
            width = layer.down.shape[1]
            if width in CONTEXT_DIM:
                return CONTEXT_DIM[width], f"cross-attention width {width} in {layer.key}"
    for name, layer in lora.layers.get("text_encoder", {}).items():
        if name.endswith(("q_proj", "q.proj")) and layer.down.shape[1] == 1024:
            return "sd2", f"text encoder width 1024 ({_TEXT_WIDTH[1024]}) in {layer.key}"
    return None


def _lookup(targets: dict[str, nn.Module], unet: nn.Module | None) -> dict[str, str]:
    """kohya's underscored names -> module names: each module's own name, and for a UNet its LDM/SGM name too."""
    lookup = {name.replace(".", "_"): name for name in targets}
    if unet is not None:
        ldm = sorted(ldm_unet_names(unet.config).items(), key=lambda kv: -len(kv[1]))
        for name in targets:
            for old, new in ldm:
                if name == new or name.startswith(new + "."):
                    lookup[(old + name[len(new) :]).replace(".", "_")] = name
                    break
    return lookup


def _plain_name(name: str, targets: dict[str, nn.Module]) -> str | None:
    """A diffusers-named module; transformers 5 saves CLIPTextModel without its `text_model.` level, older ones with."""
    for candidate in (name, "text_model." + name, name.removeprefix("text_model.")):
        if candidate in targets:
            return candidate
    return None


def _names(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class LoRAWeights:
    """The LoRAs fused into one set of models (a pipeline's), by name, and the original weights they replaced."""

    ROOM = 1 << 30  # free GPU memory kept beyond the originals when they are kept on the GPU

    def __init__(self, models: dict[str, nn.Module]) -> None:
        self.models = models
        self.loaded: dict[str, LoadedLoRA] = {}
        self.originals: dict[Key, torch.Tensor] = {}  # exactly as they were, on the GPU or pinned on the CPU
        self._modules: dict[Key, nn.Module] = {}
        self._lock = threading.Lock()

    def add(self, name: str, path: str, layers: dict[Key, LoRALayer], scale: float) -> set[str]:
        """Fuse a matched LoRA under `name` (replacing one of that name); returns the components changed."""
        _check_scale(scale)
        placed = {key: self._placed(key, layer) for key, layer in layers.items()}
        with self._lock:
            old = self.loaded.pop(name, None)
            self.loaded[name] = LoadedLoRA(path, placed, float(scale))
            return self._apply(set(layers) | (set(old.layers) if old else set()))

    def set_scales(self, scales: dict[str, float]) -> set[str]:
        """New scales for loaded LoRAs, applied in one pass over their layers (a scale of 0 leaves a LoRA loaded
        but out of the weights: {"a": 0, "b": 1} switches from a to b without reading a file)."""
        for scale in scales.values():
            _check_scale(scale)
        with self._lock:
            for name in scales:
                self._require(name)
            for name, scale in scales.items():
                self.loaded[name].scale = float(scale)
            return self._apply({key for name in scales for key in self.loaded[name].layers})

    def remove(self, name: str | None = None) -> set[str]:
        """Take one LoRA out (None: all of them); the layers no LoRA touches any more get their original weights."""
        with self._lock:
            names = list(self.loaded) if name is None else [name]
            keys = set()
            for n in names:
                self._require(n)
                keys |= set(self.loaded.pop(n).layers)
            return self._apply(keys)

    def _require(self, name: str) -> None:
        if name not in self.loaded:
            raise ValueError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(self.loaded) or 'none'}")

    def _placed(self, key: Key, layer: LoRALayer) -> LoRALayer:
        """The layer's factors on its weight's device in float32, flattened to matrices, alpha / r folded in."""
        device = self._module(key).weight.device
        up = layer.up.to(device, torch.float32).flatten(1) * (layer.alpha / layer.rank)
        return LoRALayer(layer.down.to(device, torch.float32), up, layer.rank, layer.key)  # alpha / r is now 1

    @torch.no_grad()
    def _apply(self, keys: set[Key]) -> set[str]:
        self._keep_originals([key for key in keys if key not in self.originals])
        for key in keys:
            weight = self._module(key).weight
            parts = [
                (lora.layers[key], lora.scale) for lora in self.loaded.values() if lora.scale and key in lora.layers
            ]
            if not parts:
                weight.copy_(self.originals.pop(key))
                continue
            # never add into W0 itself; contiguous, so a channels-last conv weight flattens to [out, in * kh * kw]
            fused = self.originals[key].to(weight.device, torch.float32, copy=True, memory_format=CONTIGUOUS)
            flat = fused.view(fused.shape[0], -1)
            for layer, scale in parts:
                flat.addmm_(layer.up, layer.down.reshape(layer.rank, -1), alpha=scale)
            weight.copy_(fused)
        return {component for component, _ in keys}

    def _keep_originals(self, keys: list[Key]) -> None:
        weights = {key: self._module(key).weight for key in keys}
        on_gpu, gpu_room = [w for w in weights.values() if w.is_cuda], False
        if on_gpu:
            free, _ = torch.cuda.mem_get_info(on_gpu[0].device)
            gpu_room = sum(w.nbytes for w in on_gpu) + self.ROOM <= free
        for key, weight in weights.items():
            if weight.is_cuda and gpu_room:
                self.originals[key] = weight.detach().clone()
            else:  # pinned when the weight is on a GPU: the copies back are DMA transfers
                original = weight.detach().to("cpu", copy=True)
                self.originals[key] = original.pin_memory() if weight.is_cuda else original

    def _module(self, key: Key) -> nn.Module:
        if key not in self._modules:
            component, name = key
            self._modules[key] = self.models[component].get_submodule(name)
        return self._modules[key]


def _check_scale(scale) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"LoRA scale {scale!r} must be a finite number")
