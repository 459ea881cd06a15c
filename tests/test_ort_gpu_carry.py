"""benchmarks/ort_gpu_carry.py zeroes only other GPUs' cubins in a fatbin, leaving every header and offset in place."""

import struct

from benchmarks.ort_gpu_carry import FATBIN_MAGIC, zero_other_arches

ENTRY_HEADER = 64


def entry(arch: int, payload: bytes) -> bytes:
    header = bytearray(ENTRY_HEADER)
    struct.pack_into("<HHIQ", header, 0, 2, 0x101, ENTRY_HEADER, len(payload))  # kind 2: an ELF cubin
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def fatbin(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def elf_with(sections: dict[str, bytes]) -> bytearray:
    """A minimal ELF64: the header, the sections' bytes, a name table, then the section headers."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in (*sections, ".shstrtab"))
    data, offsets = bytearray(64), {}
    for name, payload in {**sections, ".shstrtab": names}.items():
        data += bytes(-len(data) % 8)
        offsets[name] = (len(data), len(payload))
        data += payload
    data += bytes(-len(data) % 8)
    shoff = len(data)
    data += bytes(64)  # the null section
    for name, (offset, size) in offsets.items():
        data += struct.pack("<IIQQQQIIQQ", names.index(name.encode() + b"\0"), 1, 0, 0, offset, size, 0, 0, 8, 0)
    struct.pack_into("<Q", data, 0x28, shoff)
    struct.pack_into("<HHH", data, 0x3A, 64, len(offsets) + 1, len(offsets))
    return data


def test_other_architectures_are_zeroed_and_the_layout_kept():
    keep, other, later = b"\x11" * 40, b"\x22" * 24, b"\x33" * 16
    section = fatbin(entry(80, other), entry(90, keep)) + bytes(8) + fatbin(entry(120, later))  # padding between
    elf = elf_with({".text": b"\x99" * 10, ".nv_fatbin": section})
    before = bytes(elf)
    stats = zero_other_arches(elf, keep_arch=90)
    assert stats == {"kept_bytes": len(keep), "zeroed_bytes": len(other) + len(later)}
    assert len(elf) == len(before)
    assert keep in elf and b"\x99" * 10 in elf  # the kept cubin and the other sections untouched
    assert other not in elf and later not in elf
    changed = [i for i, (a, b) in enumerate(zip(before, elf, strict=True)) if a != b]
    assert len(changed) == len(other) + len(later)  # only payload bytes changed, no header
