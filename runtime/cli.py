"""The `diffrt` command line. Each subcommand lives in its own module, which exposes `add_parser(subparsers)`:
it registers its parser and sets `func`, a function of the parsed arguments that returns the exit code.
To add a subcommand, write such a module and name it in SUBCOMMANDS.
"""

import argparse
import importlib
import sys

import diffrt

SUBCOMMANDS = (
    "diffrt.cli_generate",
    "diffrt.cli_bench",
    "diffrt.loading.info",
    "diffrt.train.cli",
    "diffrt.export.cli",
    "diffrt.serve.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrt", description=diffrt.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"diffrt {diffrt.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as e:  # the project's actionable errors (CheckpointError is one): message only, no traceback
        print(f"diffrt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
