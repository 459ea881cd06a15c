"""Weight loading: diffusers folders and single-file LDM/SGM checkpoints into diffrt's modules, checked first.

`load_model(path, component)` returns one module; `read_checkpoint_components(path)` returns the weights and
configs of every component (what the pipeline uses); `read_checkpoint(file)` returns one file's tensors.
"""

from diffrt.loading.api import Checkpoint, load_model, read_checkpoint_components, unet_family
from diffrt.loading.build import build_module
from diffrt.loading.errors import CheckpointError
from diffrt.loading.finite import check_finite, nonfinite_keys
from diffrt.loading.formats import detect_format, read_checkpoint
from diffrt.loading.safetensors_io import read_header, read_safetensors
from diffrt.loading.single_file import Component

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Component",
    "build_module",
    "check_finite",
    "detect_format",
    "load_model",
    "nonfinite_keys",
    "read_checkpoint",
    "read_checkpoint_components",
    "read_header",
    "read_safetensors",
    "unet_family",
]
