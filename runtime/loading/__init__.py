"""Weight loading: diffusers folders and single-file LDM/SGM checkpoints into diffrt's modules, checked first.

`load_model(path, component)` returns one module; `read_checkpoint_components(path)` returns the weights (under
diffusers/transformers names) and configs of every component, which is what the pipeline builds on;
`read_checkpoint(file)` returns one file's tensors.

Safety: the format is told by content; safetensors headers are validated before any data is used; pickles load only
with allow_pickle=True, and then with torch.load(weights_only=True). NaN/Inf weights are an error by default
(`load_model(check_finite="error")`, naming the keys), a warning with "warn", unchecked with "off"; the scan costs
one sum per tensor where the weights live. `diffrt info --check-finite` reports them without loading a model.
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
