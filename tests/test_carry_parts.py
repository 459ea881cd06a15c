"""benchmarks/carry_parts.py: a file split into device-call parts comes back whole only when every earlier part is
already on the machine, is checked by sha256 and then finished; a part on a cold machine says so and clears up."""

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from benchmarks.carry_parts import write_parts


def put(workdir: Path, prefix: str, k: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f".{prefix}{k}/put.sh"], cwd=workdir, capture_output=True, text=True, timeout=60)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A checkout-like folder to write parts into, and unique names for the machine's /tmp: (folder, prefix, name)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".git").mkdir()
    return tmp_path, f"t{uuid.uuid4().hex[:8]}", f"{uuid.uuid4().hex}.bin"


def test_parts_reassemble_in_order_and_finish(folder):
    tmp_path, prefix, name = folder
    payload = os.urandom(5 << 19)  # 2.5 MiB in 1 MiB parts: three parts, the last one short
    n = write_parts(payload, prefix, name, finish=f"  mv /tmp/{name} {tmp_path}/whole.bin", part=1 << 20)
    assert n == 3
    sizes = [(tmp_path / f".{prefix}{k}" / f"part{k:02d}").stat().st_size for k in (1, 2, 3)]
    assert sizes == [1 << 20, 1 << 20, 1 << 19]
    assert f"/.{prefix}1/" in (tmp_path / ".git/info/exclude").read_text()
    for k in (1, 2, 3):
        r = put(tmp_path, prefix, k)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"part {k} of 3 placed" in r.stdout
    assert (tmp_path / "whole.bin").read_bytes() == payload
    assert not Path(f"/tmp/{prefix}-parts").exists()


def test_a_part_on_a_cold_machine_is_refused(folder):
    tmp_path, prefix, name = folder
    write_parts(os.urandom(3 << 20), prefix, name, finish="  echo finished", part=1 << 20)
    r = put(tmp_path, prefix, 2)  # part 1 never placed: the machine was not the warm one
    assert r.returncode == 3
    assert "found 0 earlier parts, not 1" in r.stdout
    assert not Path(f"/tmp/{prefix}-parts").exists()


def test_a_corrupt_part_fails_the_checksum(folder):
    tmp_path, prefix, name = folder
    write_parts(os.urandom(2 << 20), prefix, name, finish="  echo finished", part=1 << 20)
    part = tmp_path / f".{prefix}2" / "part02"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    assert put(tmp_path, prefix, 1).returncode == 0
    r = put(tmp_path, prefix, 2)
    assert r.returncode == 4 and "do not add up" in r.stdout and "finished" not in r.stdout
    assert not Path(f"/tmp/{name}").exists() and not Path(f"/tmp/{prefix}-parts").exists()
