"""External data confined to the export folder on load and on save, and a manifest that does not match its files
refused: each attack below is refused with a message naming it, before any session or engine reads a byte.

The folder under attack is consistent otherwise: the tests re-record the tampered model's hash in the manifest (as
whoever planted the attack could), so each refusal comes from the attack itself, not from a stale hash.
"""

import os
import shutil

import onnx
import pytest

from diffrt.assembly import components_from_preset
from diffrt.export.exported import open_export
from diffrt.export.exporter import export_components
from diffrt.loading.errors import CheckpointError
from tests.helpers.export_fixtures import (
    copy_export,
    exported,
    read_manifest_json,
    rewrite_model,
    set_external_location,
    write_manifest_json,
)

DATA = "vae_decoder.onnx.data"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A small export whose vae_decoder keeps its weights as external data (threshold 0)."""
    root = str(tmp_path_factory.mktemp("safety"))
    return exported(root, "tiny-sd15", names=["vae_decoder"], external_data_above=0, checks=())


@pytest.fixture
def folder(clean, tmp_path):
    """A private copy of the clean export, and beside it (outside it) a copy of its data file."""
    work = copy_export(clean, str(tmp_path / "export"))
    os.makedirs(tmp_path / "outside")
    shutil.copy(os.path.join(work, DATA), tmp_path / "outside" / DATA)
    return work


def refused(folder: str, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        open_export(folder)


def test_the_clean_folder_opens(folder):
    model = open_export(folder)
    entry = model.manifest["components"]["vae_decoder"]
    assert [d["file"] for d in entry["external_data"]] == [DATA]


# What onnx's checker enforces (relied on, not repeated): the data's location.
def test_absolute_external_data_path(folder, tmp_path):
    outside = str(tmp_path / "outside" / DATA)
    rewrite_model(folder, "vae_decoder", lambda m: set_external_location(m, outside))
    refused(folder, "refused by onnx's checker: .*should be a relative path, but it is an absolute path")


def test_dotdot_external_data_path(folder):
    rewrite_model(folder, "vae_decoder", lambda m: set_external_location(m, f"../outside/{DATA}"))
    refused(folder, "refused by onnx's checker: .*points outside the directory")


def test_external_data_symlink_leaving_the_folder(folder, tmp_path):
    os.unlink(os.path.join(folder, DATA))
    os.symlink(tmp_path / "outside" / DATA, os.path.join(folder, DATA))
    refused(folder, "refused by onnx's checker: .*is a symbolic link")


def test_external_data_hard_link_to_a_file_outside(folder, tmp_path):
    os.unlink(os.path.join(folder, DATA))
    os.link(tmp_path / "outside" / DATA, os.path.join(folder, DATA))
    refused(folder, "refused by onnx's checker: .*multiple hard links")


# What it does not, added by diffrt.export.safety.
def test_model_file_symlink(folder, tmp_path):
    shutil.copy(os.path.join(folder, "vae_decoder.onnx"), tmp_path / "outside" / "vae_decoder.onnx")
    os.unlink(os.path.join(folder, "vae_decoder.onnx"))
    os.symlink(tmp_path / "outside" / "vae_decoder.onnx", os.path.join(folder, "vae_decoder.onnx"))
    refused(folder, "model 'vae_decoder.onnx' is a symbolic link")


def test_model_file_hard_link(folder, tmp_path):
    os.link(os.path.join(folder, "vae_decoder.onnx"), tmp_path / "outside" / "linked.onnx")
    refused(folder, "model 'vae_decoder.onnx' has 2 hard links")


def test_manifest_symlink(folder, tmp_path):
    shutil.move(os.path.join(folder, "manifest.json"), tmp_path / "outside" / "manifest.json")
    os.symlink(tmp_path / "outside" / "manifest.json", os.path.join(folder, "manifest.json"))
    refused(folder, "manifest 'manifest.json' is a symbolic link")


def test_external_data_read_past_its_file(folder):
    def lengthen(model: onnx.ModelProto) -> None:
        tensor = max(model.graph.initializer, key=lambda t: t.dims[0] if t.dims else 0)
        for item in tensor.external_data:
            if item.key == "length":
                item.value = str(10**12)

    rewrite_model(folder, "vae_decoder", lengthen)
    refused(folder, f"reads bytes .* of {DATA} .*the file is corrupt")


def test_external_data_the_manifest_does_not_list(folder):
    manifest = read_manifest_json(folder)
    manifest["components"]["vae_decoder"]["external_data"] = []
    write_manifest_json(folder, manifest)
    refused(folder, rf"references external data \['{DATA}'\] that its manifest does not list")


def test_changed_bytes_of_the_same_size(folder):
    path = os.path.join(folder, DATA)
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    refused(folder, f"{DATA} does not match its manifest's sha256")


def test_truncated_data(folder):
    path = os.path.join(folder, DATA)
    os.truncate(path, os.path.getsize(path) // 2)
    refused(folder, f"{DATA} is .* bytes, its manifest says")


def test_missing_model(folder):
    os.unlink(os.path.join(folder, "vae_decoder.onnx"))
    refused(folder, "model 'vae_decoder.onnx' is missing")


def test_manifest_naming_a_path_outside(folder):
    manifest = read_manifest_json(folder)
    manifest["components"]["vae_decoder"]["file"] = "../outside/vae_decoder.onnx"
    write_manifest_json(folder, manifest)
    refused(folder, "model '../outside/vae_decoder.onnx' is not a plain relative path inside the export folder")


def test_changed_tokenizer(folder):
    with open(os.path.join(folder, "tokenizer", "tokenizer.json"), "a") as f:
        f.write(" ")
    refused(folder, "tokenizer/tokenizer.json is .* bytes, its manifest says")


def test_the_backend_refuses_what_open_export_refuses(folder):
    from diffrt.backends.onnxruntime import OnnxRuntimeBackend
    from diffrt.pipeline import Pipeline

    os.truncate(os.path.join(folder, DATA), 10)
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        Pipeline.from_export(folder, backend=OnnxRuntimeBackend())


def test_saving_replaces_planted_links_instead_of_writing_through_them(tmp_path):
    """CVE-2025-51480 wrote through a path an attacker chose: here every file is written beside its destination
    and renamed over it, so a symlink or hard link planted at the destination is replaced, its target untouched."""
    victim_sym, victim_hard = tmp_path / "victim-sym", tmp_path / "victim-hard"
    victim_sym.write_bytes(b"precious")
    victim_hard.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim_sym, out / "vae_decoder.onnx")
    os.link(victim_hard, out / DATA)
    export_components(components_from_preset("tiny-sd15", 0), out, names=["vae_decoder"], progress=False,
                      external_data_above=0, checks=())  # fmt: skip
    assert victim_sym.read_bytes() == victim_hard.read_bytes() == b"precious"
    assert not os.path.islink(out / "vae_decoder.onnx") and os.stat(out / DATA).st_nlink == 1
    open_export(out)
