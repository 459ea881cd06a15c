"""An export folder opened for running: every file checked against its manifest, the model described from it.

    model = open_export("out/")      # CheckpointError if any file does not match (diffrt.export.safety)
    model.spec, model.tokenizers(), model.model_path("unet"), model.graph("unet"), model.config("vae_decoder")

Nothing here needs torch modules or weights: a pipeline runs from the folder alone (diffrt.backends.onnxruntime).
"""

import os
from dataclasses import dataclass, field

from diffrt.export.graphs import GraphSpec
from diffrt.export.manifest import read_manifest
from diffrt.export.safety import check_file, check_onnx
from diffrt.loading.errors import CheckpointError
from diffrt.model_spec import ModelSpec, model_spec
from diffrt.models.clip import CLIPTextConfig
from diffrt.models.taesd import TAESDConfig
from diffrt.models.unet_config import UNetConfig
from diffrt.models.vae import AutoencoderKLConfig
from diffrt.tokenizer import CLIPTokenizer

CONFIGS = {"UNet2DConditionModel": UNetConfig, "AutoencoderKL": AutoencoderKLConfig, "AutoencoderTiny": TAESDConfig,
           "CLIPTextModel": CLIPTextConfig}  # fmt: skip
PIPELINE_COMPONENTS = ("unet", "vae_decoder")  # the least a text-to-image run needs, besides a text encoder


@dataclass
class ExportedModel:
    folder: str
    manifest: dict
    paths: dict[str, str] = field(default_factory=dict)  # component -> its checked .onnx

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.manifest["components"])

    def model_path(self, component: str) -> str:
        if component not in self.paths:
            raise CheckpointError(
                f"{self.folder}: has no {component} (exported: {', '.join(self.components)}); export it with "
                f"diffrt export --components {component}"
            )
        return self.paths[component]

    def graph(self, component: str) -> GraphSpec:
        self.model_path(component)
        return GraphSpec.from_json(self.manifest["components"][component]["graph"])

    def config(self, component: str):
        entry = self.manifest["components"][component]
        return CONFIGS[entry["class"]](**entry["config"])

    def dtype(self, component: str) -> str:
        return self.manifest["components"][component]["dtype"]

    def tokenizers(self) -> tuple[CLIPTokenizer | None, CLIPTokenizer | None]:
        found = [self.manifest["tokenizers"].get(key) for key in ("tokenizer", "tokenizer_2")]
        return tuple(CLIPTokenizer.from_pretrained(os.path.join(self.folder, k)) if f else None
                     for k, f in zip(("tokenizer", "tokenizer_2"), found, strict=True))  # fmt: skip

    @property
    def spec(self) -> ModelSpec:
        """What a pipeline needs to know of the model; read from the manifest alone (describe_export gives it
        before any file is checked)."""
        present = set(self.components)
        missing = [c for c in PIPELINE_COMPONENTS if c not in present]
        if missing or not {"text_encoder", "text_encoder_2"} & present:
            raise CheckpointError(
                f"{self.folder}: a pipeline needs unet, vae_decoder and a text encoder; this export has "
                f"{', '.join(self.components)}; export the whole model (diffrt export without --components)"
            )
        model = self.manifest["model"]
        encoders = tuple(self.config(c) if c in present else None for c in ("text_encoder", "text_encoder_2"))
        return model_spec(
            self.config("unet"),
            self.config("vae_decoder"),
            encoders,
            model["scheduler_config"],
            model["parameters"],
            force_zeros_for_empty_prompt=model["force_zeros_for_empty_prompt"],
            is_random=model["is_random"],
        )


def describe_export(folder: str | os.PathLike) -> ExportedModel:
    """The manifest read, no file checked or opened yet: enough to check a request (CLI) before loading."""
    folder = os.path.abspath(os.fspath(folder))
    return ExportedModel(folder, read_manifest(folder))


def open_export(folder: str | os.PathLike, components: tuple[str, ...] | None = None) -> ExportedModel:
    """Check the folder's files (all, or `components` and the tokenizers) against its manifest and open it."""
    folder = os.path.abspath(os.fspath(folder))
    manifest = read_manifest(folder)
    wanted = manifest["components"] if components is None else components
    paths = {}
    for name in wanted:
        if name not in manifest["components"]:
            raise CheckpointError(f"{folder}: has no {name} (exported: {', '.join(manifest['components'])})")
        paths[name] = check_onnx(folder, manifest["components"][name])
    for entries in manifest["tokenizers"].values():
        for entry in entries:
            check_file(folder, entry, "tokenizer file")
    return ExportedModel(folder, manifest, paths)
