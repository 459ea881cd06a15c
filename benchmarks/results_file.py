"""Result files written whole or not at all: the device tool kills a command at its time limit, and a JSON file torn
mid-write would lose every row the call had measured, where a rename leaves the last whole one."""

import json
from pathlib import Path

from diffrt.export.files import write_atomically


def write_json(path, obj, indent: int = 1) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(str(path), (json.dumps(obj, indent=indent) + "\n").encode())
