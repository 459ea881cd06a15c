import subprocess
import sys


def test_import_is_cheap():
    """Importing diffrt must not import Triton or model code (nothing runs at import)."""
    code = "import sys, diffrt; assert 'triton' not in sys.modules, 'triton imported'; print(diffrt.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.1.0"


def test_no_import_cycle_in_the_package():
    """Every import between diffrt's modules, at module level or inside a function (not TYPE_CHECKING-only ones),
    read from the source: the graph has no cycle."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    folders = {"diffrt": root / "runtime", "diffrt.kernels": root / "kernels", "diffrt.export": root / "export"}
    modules: dict[str, Path] = {}
    for package, folder in folders.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "diffrt" and parts[0] in ("kernels", "export"):
                continue  # device-copy symlinks of the other folders
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = path

    def imported(path: Path, name: str) -> set[str]:
        tree, found = ast.parse(path.read_text()), set()
        guarded = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
            node.test) for n in ast.walk(node)}  # fmt: skip
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        return {m for m in found if m in modules and m != name}

    graph = {name: imported(path, name) for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
