"""TensorRT-RTX's part 1 re-split so that each part fits a device call beside this repository's working tree.

    bash ../shared/tools/trt_rtx_carry.sh && python3 benchmarks/trt_rtx_parts.py     # from the project root

The shared script packs libtensorrt_rtx.so.1 as one 63 MiB xz (.trt1), which with our 34 MiB tree is over the
device tool's 64 MiB carry limit, so the call is refused. This splits that file into .trtpK/ parts (git-ignored);
the last part's put.sh decompresses it where the shared stage1.sh would (/tmp/trtrtx/tensorrt_rtx_libs), so the
shared .trt2/stage2.sh then works unchanged. Device calls on one warm machine, back to back:
    K = 1..N:   carry [".trtpK"], command: bash .trtpK/put.sh
    then:       carry [".trt2", ...], command: source .trt2/stage2.sh && ...
"""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels

from benchmarks.carry_parts import write_parts

SOURCE = Path(".trt1/libtensorrt_rtx.so.1.xz")
NAME = "libtensorrt_rtx.so.1.xz"
INSTALL = (  # stage1.sh's step, once the xz is whole
    "  d=/tmp/trtrtx/tensorrt_rtx_libs; mkdir -p $d\n"
    f"  xz -d -T8 -c /tmp/{NAME} > $d/libtensorrt_rtx.so.1 && rm /tmp/{NAME} && echo 'stage1 ok'"
)


def main() -> None:
    if not SOURCE.is_file() or SOURCE.stat().st_size == 0:
        raise SystemExit(f"{SOURCE} is missing or empty: run bash ../shared/tools/trt_rtx_carry.sh first")
    write_parts(SOURCE.read_bytes(), "trtp", NAME, INSTALL)


if __name__ == "__main__":
    main()
