"""Split one large file into parts that each fit a device call beside the working tree, with a put.sh per part.

A device call carries at most 64 MiB including the working tree (about 34 MiB here: the embedded models), so a
library of 60 MiB or more goes over in several calls on one warm machine, back to back. Part K's put.sh checks that
parts 1..K-1 are already on the machine (else it was not warm: start again from part 1); the last one reassembles,
checks the sha256 and runs `finish` (unpack, install).
"""

import hashlib
import shutil
import subprocess
from pathlib import Path

CARRY_LIMIT_MIB = 62  # of the device tool's 64 MiB, with room for what git adds


def tree_mib() -> int:
    """The tracked working tree's size, which every device call carries."""
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
    return sum(Path(p.decode()).stat().st_size for p in tracked if p and Path(p.decode()).is_file()) >> 20


def put_script(prefix: str, k: int, n: int, name: str, digest: str, finish: str) -> str:
    parts = f"/tmp/{prefix}-parts"
    return f"""set -e; mkdir -p {parts}
have=$(ls {parts} 2>/dev/null | wc -l)
[ "$have" -eq {k - 1} ] || {{ echo "part {k} of {n}: found $have earlier parts, not {k - 1}: the machine was not warm; start again from part 1"; rm -rf {parts}; exit 3; }}
cp .{prefix}{k}/part* {parts}/ && echo "part {k} of {n} placed"
if [ {k} -eq {n} ]; then
  cat {parts}/part* > /tmp/{name}
  echo "{digest}  /tmp/{name}" | sha256sum -c - || {{ echo "the parts do not add up to {name}: prepare them again"; rm -rf {parts} /tmp/{name}; exit 4; }}
  rm -rf {parts}
{finish}
fi
"""  # noqa: E501


def write_parts(packed: bytes, prefix: str, name: str, finish: str, part: int | None = None) -> int:
    """Folders .{prefix}1.. (git-ignored) in the current directory, each a part of `packed` (`part` bytes; default
    what the carry limit leaves beside the tree) and its put.sh; returns how many."""
    part = part or (CARRY_LIMIT_MIB - tree_mib() - 2) << 20
    if part < 1 << 20:
        raise SystemExit(f"the tree ({tree_mib()} MiB) leaves no room for parts")
    digest = hashlib.sha256(packed).hexdigest()
    for old in Path(".").glob(f".{prefix}[0-9]*"):
        shutil.rmtree(old)
    chunks = [packed[i : i + part] for i in range(0, len(packed), part)]
    exclude = Path(".git/info/exclude")
    exclude.parent.mkdir(parents=True, exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    for k, chunk in enumerate(chunks, 1):
        folder = Path(f".{prefix}{k}")
        folder.mkdir()
        (folder / f"part{k:02d}").write_bytes(chunk)
        (folder / "put.sh").write_text(put_script(prefix, k, len(chunks), name, digest, finish))
        if f"/{folder}/" not in lines:
            lines.append(f"/{folder}/")
    exclude.write_text("\n".join(lines) + "\n")
    print(f"{len(packed) / 2**20:.0f} MiB in {len(chunks)} parts: make {len(chunks)} device calls back to back, "
          f'K = 1..{len(chunks)}: carry [".{prefix}K"], command: bash .{prefix}K/put.sh')  # fmt: skip
    return len(chunks)
