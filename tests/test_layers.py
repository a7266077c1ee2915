"""The package's layers: every import runs down (or within a layer), and no private name is
imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "primal_dual_attention"
#: bottom to top; a module may import from its own layer and the layers below it
LAYERS = (("utils",), ("functional", "causal"), ("primal", "attention"), ("models", "timm", "hf", "data"),
          ("training",),
          ("analysis",), ("cli",))
LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}


def _imports() -> list[tuple[str, str, list[str]]]:
    """(importing module, imported module, imported names) for every import of the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("primal_dual_attention"):
                found.append((module, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                found += [(module, a.name, []) for a in node.names
                          if a.name.startswith("primal_dual_attention")]
    return found


def _layer(module: str) -> int | None:
    """The layer of ``primal_dual_attention.<top>...``; None for the package itself."""
    parts = module.split(".")
    return LAYER[parts[1]] if len(parts) > 1 and parts[1] != "__init__" else None


def test_every_module_has_a_layer():
    tops = {p.relative_to(PACKAGE).with_suffix("").parts[0] for p in PACKAGE.rglob("*.py")}
    assert tops - {"__init__"} == set(LAYER)


def test_no_import_runs_up_a_layer():
    upward = [(a, b) for a, b, _ in _imports()
              if None not in (_layer(a), _layer(b)) and _layer(b) > _layer(a)]
    assert upward == []


def test_no_private_name_is_imported_across_modules():
    private = [(a, b, n) for a, b, names in _imports() for n in names if n.startswith("_")]
    assert private == []
