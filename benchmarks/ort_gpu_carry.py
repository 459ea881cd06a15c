"""onnxruntime-gpu for the device in fewer parts: the CUDA provider's kernels for other GPUs zeroed, then xz.

    python3 benchmarks/ort_gpu_carry.py [--arch 90]      # run from the project root; needs the package registry

The wheel is 256 MB and a device call carries about 27 MiB beside the working tree, so the plain wheel takes ten
warm calls (../shared/tools/ort_gpu_carry.sh). 219 MB of it is the CUDA provider's fatbin: ELF cubins for sm_75,
80, 86, 89, 90 and 120, of which an H200 (compute capability 9.0) can load only the sm_90 ones (SASS does not run
across major versions). This script keeps every fatbin header and offset and overwrites the payloads of the other
architectures' cubins with zeros, which xz reduces to nothing, so the library keeps its exact layout and its size.
What it writes, like the shared script: .ortgK/ folders (git-ignored), each with a part and put.sh; make the calls
back to back on one warm machine (carry [".ortgK"], command `bash .ortgK/put.sh`); the last reassembles, checks the
sha256, unpacks into /tmp/ortgpu and lists the providers.
"""

import argparse
import io
import lzma
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.carry_parts import write_parts

VERSION = "1.31.1"
FATBIN_MAGIC = 0xBA55ED50
INSTALL = (  # what the last part runs once the archive is whole
    "  mkdir -p /tmp/ortgpu && tar -xJf /tmp/{name} -C /tmp/ortgpu\n"
    '  PYTHONPATH=/tmp/ortgpu python3 -c "import onnxruntime as o; o.preload_dlls(); '
    "print('onnxruntime', o.__version__, o.get_available_providers())\""
)


def section(elf: bytes, wanted: str) -> tuple[int, int]:
    """(offset, size) of an ELF64 section by name."""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    for h in headers:
        start = names_offset + h[0]
        if elf[start : elf.index(b"\0", start)].decode() == wanted:
            return h[4], h[5]
    raise ValueError(f"no {wanted} section")


def zero_other_arches(elf: bytearray, keep_arch: int) -> dict:
    """Zero the payload of every fatbin entry whose SM architecture is not keep_arch; headers stay as they are."""
    start, size = section(bytes(elf), ".nv_fatbin")
    kept = zeroed = 0
    p, end = start, start + size
    while p < end:
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", elf, p)
        if magic != FATBIN_MAGIC:  # fatbins are 8-byte aligned with padding between them
            p += 8
            continue
        q, last = p + header_size, p + header_size + fat_size
        while q < last:
            _kind, _unknown, entry_header, payload = struct.unpack_from("<HHIQ", elf, q)
            arch = struct.unpack_from("<I", elf, q + 28)[0]
            body = q + entry_header
            if arch == keep_arch:
                kept += payload
            else:
                elf[body : body + payload] = bytes(payload)
                zeroed += payload
            q = body + payload
        p = last
    return {"kept_bytes": kept, "zeroed_bytes": zeroed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="the SM architecture to keep (90: H100/H200)")
    ap.add_argument("--wheel", help="an onnxruntime-gpu wheel already downloaded")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        wheel = args.wheel
        if wheel is None:
            platform = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"]
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            *platform, "-d", str(tmp), f"onnxruntime-gpu=={VERSION}"], check=True)  # fmt: skip
            wheel = str(next(tmp.glob("onnxruntime_gpu-*.whl")))
        buffer = io.BytesIO()
        with zipfile.ZipFile(wheel) as z, tarfile.open(fileobj=buffer, mode="w") as tar:
            for info in z.infolist():
                data = z.read(info)
                if info.filename.endswith("libonnxruntime_providers_cuda.so"):
                    data = bytearray(data)
                    print(f"{info.filename}: {zero_other_arches(data, args.arch)}")
                entry = tarfile.TarInfo(info.filename)
                entry.size, entry.mode = len(data), 0o755 if info.filename.endswith(".so") else 0o644
                tar.addfile(entry, io.BytesIO(bytes(data)))
        packed = lzma.compress(buffer.getvalue(), preset=6)
        name = f"onnxruntime_gpu-{VERSION}-sm{args.arch}.tar.xz"
        write_parts(packed, "ortg", name, finish=INSTALL.format(name=name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
