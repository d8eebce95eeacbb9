"""The house's layout: the library never imports the trainer or the tools, no package imports back up, rooms stay small."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "attnjax"
LIBRARY = ["blocks", "models", "layers", "ops", "data", "validate", "nnx", "xla_options"]
UPPER = ("attnjax.train", "attnjax.compare", "attnjax.viz")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The attnjax modules ``path`` imports, at any depth of its code (``from attnjax.x import y`` counts x.y too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("attnjax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attnjax"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def top(name: str) -> str:
    """The room of a module: ``attnjax.blocks.se`` -> ``blocks``, ``attnjax.train.hooks.x`` -> ``train``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("room", LIBRARY)
def test_the_library_never_imports_the_trainer_or_the_tools(room):
    paths = [p for p in FILES if top(module_name(p)) == room]
    assert paths, room
    for path in paths:
        upward = sorted(name for name in imported(path) if name.startswith(UPPER))
        assert not upward, f"{path.relative_to(PACKAGE.parent)} imports {upward}"


def test_importing_the_library_loads_no_trainer_module():
    script = (
        "import sys\n"
        f"import {', '.join('attnjax.' + room for room in LIBRARY)}\n"
        f"print(sorted(m for m in sys.modules if m.startswith({UPPER!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_no_import_cycle_between_rooms():
    """The graph of rooms (``blocks``, ``train``, ``compare``, ...) by their imports has no cycle."""
    rooms = {top(module_name(path)) for path in FILES} - {""}
    edges = {}
    for path in FILES:
        source = top(module_name(path))
        for target in {top(name) for name in imported(path)} & rooms - {source}:
            edges.setdefault(source, set()).add(target)

    def reaches(start, goal, seen=()):
        return any(
            nxt == goal or (nxt not in seen and reaches(nxt, goal, (*seen, nxt))) for nxt in edges.get(start, ())
        )

    cycles = sorted(room for room in edges if reaches(room, room))
    assert not cycles, f"rooms in an import cycle: {cycles}; edges {edges}"


def test_the_trainer_cli_is_imported_only_by_entry_points():
    """``attnjax.train.cli`` imports the trainer; nothing in the trainer imports it back (``__main__`` aside)."""
    importers = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in FILES
        if "attnjax.train.cli" in imported(path) and path.name != "__main__.py"
    )
    assert importers == [], importers


def test_no_file_is_over_400_lines():
    long = [f"{p.relative_to(PACKAGE.parent)} ({n})" for p in FILES if (n := p.read_text().count("\n")) > MAX_LINES]
    assert not long, long


# Modules that read or write timm's torch tensors import torch inside the function that needs it.
TORCH_IN_FUNCTIONS = {"attnjax.models.timm_weights", "attnjax.models.pretrained"}


def test_only_the_pytorch_module_imports_torch():
    """PyTorch is the parity tests' and benchmarks' extra, never the library's: one module imports it, and
    the modules that hand tensors to timm import it only where they do (so importing them needs no torch)."""
    importers, at_top = [], []
    for path in FILES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name == "torch" or name.startswith("torch.") for name in names):
                importers.append(module_name(path))
                if node in tree.body:
                    at_top.append(module_name(path))
    assert sorted(set(at_top)) == ["attnjax.compare.pytorch"]
    assert "attnjax.compare.pytorch" in importers and set(importers) <= {"attnjax.compare.pytorch", *TORCH_IN_FUNCTIONS}


def test_scripts_import_attnjax_as_installed():
    """The experiments and the notebook never put tests/ or the repository's root on sys.path (issue 18)."""
    root = PACKAGE.parent
    scripts = sorted((root / "experiments").glob("*.py")) + sorted((root / "experiments").glob("*.ipynb"))
    assert scripts
    offenders = [
        str(p.relative_to(root))
        for p in scripts
        if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()
    ]
    assert not offenders, offenders
