"""Checkpoint files: format detection by content, safetensors errors in words (one bad file per rejection), the pickle
opt-in, and the NaN/Inf report. No model code involved."""

import json
import os
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffrt.loading import CheckpointError, check_finite, detect_format, nonfinite_keys, read_checkpoint, read_header


def write_raw(path, header: dict, data: bytes, header_len: int | None = None) -> str:
    """A safetensors file with exactly this header and data (no validation: this is how bad files are made)."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return str(path)


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.fixture
def good(tmp_path) -> str:
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(4).half(),
        "e": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }
    path = str(tmp_path / "good.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_valid_file_reads_like_the_reference_library(good):
    ours, ref = read_checkpoint(good), load_file(good)
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    assert read_header(good).metadata == {"format": "pt"}
    assert detect_format(good) == "safetensors"


def test_tensors_are_writable_copy_on_write_views(good):
    before = Path(good).read_bytes()
    t = read_checkpoint(good)["a"]
    t.add_(1.0)  # ACCESS_COPY map: private pages, the file is untouched
    assert Path(good).read_bytes() == before


def test_misaligned_tensor_is_read_correctly(tmp_path):
    # a 1-byte tensor first puts the float32 at an odd offset; allowed by the format, never written by the library
    data = b"\x07" + struct.pack("<2f", 1.5, -2.0)
    path = write_raw(tmp_path / "m.safetensors", {"u": entry("U8", [1], 0, 1), "f": entry("F32", [2], 1, 9)}, data)
    out = read_checkpoint(path)
    assert out["u"].tolist() == [7] and out["f"].tolist() == [1.5, -2.0]


@pytest.mark.parametrize(
    "header_len, needle",
    [
        (10**9, "bad header length 1000000000"),
        (1, r"header is not valid UTF-8 JSON for safetensors \(EOF"),
        (2**64 - 1, "bad header length"),
    ],  # a 1-byte header is "{" and then nothing
)
def test_bad_header_length(tmp_path, header_len, needle):
    path = write_raw(tmp_path / "x.safetensors", {"a": entry("F32", [1], 0, 4)}, b"\0" * 4, header_len=header_len)
    with pytest.raises(CheckpointError, match=needle) as e:
        read_checkpoint(path)
    assert "x.safetensors" in str(e.value)


def test_non_json_header(tmp_path):
    path = tmp_path / "x.safetensors"
    raw = b"{not json at all}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: header is not valid UTF-8 JSON"):
        read_checkpoint(str(path))


def test_non_utf8_header(tmp_path):
    path = tmp_path / "x.safetensors"
    raw = b'{"\xff": 1}'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        read_checkpoint(str(path))


def test_header_not_an_object(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2) + b"{}")  # an empty header is valid: no tensors
    assert read_checkpoint(str(path)) == {}
    path.write_bytes(struct.pack("<Q", 9) + b"{ } [1,2]")  # starts like JSON, is not
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        read_checkpoint(str(path))
    path.write_bytes(struct.pack("<Q", 5) + b"[1,2]")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):  # not recognized as safetensors at all
        read_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="header must be a JSON object, got list"):  # the reader says why
        read_header(str(path))


def test_duplicate_key(tmp_path):
    path = tmp_path / "x.safetensors"
    one = b'{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    raw = b'{"a": ' + one + b', "a": ' + one + b"}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0")
    with pytest.raises(CheckpointError, match=r"duplicate key\(s\) in header: \['a'\]"):
        read_checkpoint(str(path))


def test_unknown_dtype(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": entry("C99", [1], 0, 8)}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"unknown dtype 'C99'; known: BOOL, .*F32"):
        read_checkpoint(path)


def test_offsets_out_of_range(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": entry("F32", [4], 0, 16)}, b"\0" * 8)
    with pytest.raises(
        CheckpointError, match=r"data_offsets do not cover the 8-byte data buffer exactly \(they run past its end"
    ):
        read_checkpoint(path)


def test_truncated_file(good, tmp_path):
    data = Path(good).read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[:-5])
    with pytest.raises(CheckpointError, match="do not cover the .*-byte data buffer exactly .* truncated"):
        read_checkpoint(str(path))
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(CheckpointError, match="bad header length"):
        read_checkpoint(str(path))


def test_overlapping_tensors(tmp_path):
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}
    path = write_raw(tmp_path / "x.safetensors", header, b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"tensor 'b' has invalid data_offsets: .* without overlap or gap"):
        read_checkpoint(path)


def test_gap_and_trailing_bytes(tmp_path):
    path = write_raw(tmp_path / "gap.safetensors", {"a": entry("F32", [1], 4, 8)}, b"\0" * 8)
    with pytest.raises(CheckpointError, match="tensor 'a' has invalid data_offsets: each tensor must start where"):
        read_checkpoint(path)
    path = write_raw(tmp_path / "trail.safetensors", {"a": entry("F32", [1], 0, 4)}, b"\0" * 9)
    with pytest.raises(
        CheckpointError, match="do not cover the 9-byte data buffer exactly .* bytes trail the last tensor"
    ):
        read_checkpoint(path)


def test_size_does_not_match_shape(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": entry("F16", [3, 2], 0, 8)}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"tensor 'w' spans 8 bytes but F16 \[3, 2\] needs 12"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "not valid UTF-8 JSON .*integer `-1`"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "tensor 'w' has invalid data_offsets"),
        ({"dtype": "F32", "shape": [1]}, "missing field `data_offsets`"),
    ],
)
def test_malformed_entries(tmp_path, bad, needle):
    path = write_raw(tmp_path / "x.safetensors", {"w": bad}, b"\0" * 4)
    with pytest.raises(CheckpointError, match=needle):
        read_checkpoint(path)


# --- pickles -------------------------------------------------------------------------------------------------------


def _pickles(tmp_path) -> list[str]:
    sd = {"w": torch.arange(4.0), "step": 3}
    zip_path, legacy_path = str(tmp_path / "model.ckpt"), str(tmp_path / "legacy.pt")
    torch.save({"state_dict": sd, "global_step": 10}, zip_path)
    torch.save(sd, legacy_path, _use_new_zipfile_serialization=False)
    return [zip_path, legacy_path]


def test_pickle_refused_without_opt_in(tmp_path):
    for path, fmt in zip(_pickles(tmp_path), ("torch-zip", "pickle"), strict=True):
        assert detect_format(path) == fmt
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(path)
        msg = str(e.value)
        assert path in msg and "run arbitrary code" in msg and "allow_pickle=True" in msg and "--allow-pickle" in msg


def test_pickle_accepted_with_opt_in(tmp_path):
    for path in _pickles(tmp_path):
        out = read_checkpoint(path, allow_pickle=True)
        assert list(out) == ["w"] and torch.equal(out["w"], torch.arange(4.0))  # non-tensors dropped, nesting undone


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_opt_in_still_refuses_code(tmp_path, monkeypatch):
    """weights_only=True: a pickle that would run code fails to load, and the code does not run."""
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "evil.pt")
    torch.save({"w": torch.zeros(1), "x": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_checkpoint(path, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_format_comes_from_content_not_suffix(tmp_path, good):
    disguised = str(tmp_path / "model.safetensors")  # a pickle named .safetensors
    torch.save({"w": torch.zeros(2)}, disguised)
    with pytest.raises(CheckpointError, match="refusing to load a pickle"):
        read_checkpoint(disguised)
    renamed = str(tmp_path / "model.ckpt")  # safetensors named .ckpt: loads without any opt-in
    os.rename(good, renamed)
    assert detect_format(renamed) == "safetensors" and "a" in read_checkpoint(renamed)
    raw_pickle = str(tmp_path / "raw.bin")
    with open(raw_pickle, "wb") as f:
        pickle.dump({"w": 1}, f, protocol=4)
    assert detect_format(raw_pickle) == "pickle"


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "unknown checkpoint format"),
        (b"hello world, this is not a checkpoint", "unknown checkpoint format"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer"),
        (b"GGUF\x03\x00\x00\x00" + b"\0" * 16, "GGUF"),
    ],
)
def test_unknown_format(tmp_path, content, needle):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=needle) as e:
        read_checkpoint(str(path))
    assert str(path) in str(e.value)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    import zipfile

    path = tmp_path / "model.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="zip archive without data.pkl"):
        read_checkpoint(str(path), allow_pickle=True)


# --- NaN / Inf -----------------------------------------------------------------------------------------------------


def test_nonfinite_report_names_keys_and_counts():
    sd = {
        "ok": torch.randn(100),
        "nan": torch.tensor([1.0, float("nan"), float("nan")]),
        "inf": torch.tensor([float("inf"), -float("inf"), 0.0]).half(),
        "bf": torch.tensor([float("nan"), 1.0]).bfloat16(),
        "ints": torch.tensor([1, 2]),
        # fp16 values whose sum overflows fp16: the fast check flags it, the exact count clears it
        "big_but_finite": torch.full((10_000,), 60000.0).half(),
    }
    assert nonfinite_keys(sd) == {"nan": (2, 0), "inf": (0, 2), "bf": (1, 0)}


def test_check_finite_modes():
    sd = {"unet.w": torch.tensor([0.0, float("nan")]), "fine": torch.ones(3)}
    with pytest.raises(CheckpointError, match=r"src: 1 weight tensor\(s\) hold NaN/Inf: unet.w \(1 NaN, 0 Inf\)"):
        check_finite(sd, "src")
    with pytest.warns(UserWarning, match=r"unet.w \(1 NaN, 0 Inf\)"):
        assert check_finite(sd, "src", "warn") == {"unet.w": (1, 0)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_finite(sd, "src", "off") == {}
    with pytest.raises(ValueError, match="check_finite='maybe'"):
        check_finite(sd, "src", "maybe")
