"""The layer rules of docs/architecture.md ("Layers"), read from the imports themselves.

Every import between project modules counts, at module level and inside functions alike (a
function-level import hides a dependency from readers, not from the layering). A part (a
subpackage of ``pipeline``, or a top-level module) may import its own modules and the parts of
lower layers; no import may point up, and neither the module graph nor the part graph may hold a
cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def imports(mods: dict[str, Path]) -> set[tuple[str, str]]:
    """(importer, imported) between project modules, every ``import``/``from`` anywhere in a file."""
    edges = set()
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # ``from pipeline.x import y`` may name a module y or an attribute of x
                targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
            for t in targets:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    edges.add((name, t))
                    break
    return edges


def part_of(module: str) -> str:
    bits = module.split(".")
    return ".".join(bits[:2])


def declared_layers(doc: Path = ROOT / "docs" / "architecture.md") -> dict[str, int]:
    """Part -> layer number, from the table under "## Layers" (rows ``| n | `part`, `part` | ...``)."""
    text = doc.read_text()
    m = re.search(r"^## Layers\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"{doc}: no '## Layers' section"
    layers: dict[str, int] = {}
    for row in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", m.group(1), re.M):
        for part in re.findall(r"`([\w.]+)`", row[1]):
            layers[part] = int(row[0])
    return layers


def upward_edges(edges: set[tuple[str, str]], layers: dict[str, int]) -> list[str]:
    bad = []
    for a, b in sorted(edges):
        pa, pb = part_of(a), part_of(b)
        if pa != pb and layers[pb] > layers[pa]:
            bad.append(f"{a} (layer {layers[pa]}) imports {b} (layer {layers[pb]})")
    return bad


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_part_has_a_layer():
    layers = declared_layers()
    missing = sorted({part_of(m) for m in modules()} - set(layers))
    assert not missing, f"parts without a layer in docs/architecture.md: {missing}"


def test_no_import_points_up_the_layers():
    bad = upward_edges(imports(modules()), declared_layers())
    assert not bad, f"{len(bad)} upward imports:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules_or_parts():
    edges = imports(modules())
    parts = {(part_of(a), part_of(b)) for a, b in edges if part_of(a) != part_of(b)}
    found = cycles(edges) + cycles(parts)
    assert not found, f"import cycles: {found}"


def test_readme_layout_names_every_part_of_the_tree():
    """The README's "Layout" paragraph lists the library's subpackages (``pipeline/`` the library
    (``name/``, ...)): each one in the tree, and nothing that is not there."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Layout\n.*?`pipeline/` the library \(([^)]*)\)", text, re.S | re.M)
    assert m, "README.md: no '## Layout' paragraph listing `pipeline/` the library (...)"
    named = set(re.findall(r"`(\w+)/`", m.group(1)))
    tree = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert named == tree, f"README layout names {sorted(named - tree)} not in the tree; misses {sorted(tree - named)}"


def test_the_rules_can_fail(tmp_path):
    """A function-level import that points up, and a two-module cycle, are both reported."""
    pkg = tmp_path / "pipeline"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from pipeline.high.b import g\n    return g\n")
    (pkg / "high" / "b.py").write_text("from pipeline.low import a\n\ndef g():\n    return a\n")
    edges = imports(modules(pkg))
    assert ("pipeline.low.a", "pipeline.high.b") in edges
    assert upward_edges(edges, {"pipeline.low": 0, "pipeline.high": 1, "pipeline": 0})
    assert cycles(edges) == [["pipeline.high.b", "pipeline.low.a"]]


@pytest.mark.parametrize("stmt,expected", [("from pipeline.sgtm import masking", "pipeline.sgtm.masking"),
                                            ("from . import masking", "pipeline.sgtm.masking"),
                                            ("import pipeline.sgtm.masking as m", "pipeline.sgtm.masking")])
def test_import_forms_resolve_to_modules(tmp_path, stmt, expected):
    pkg = tmp_path / "pipeline" / "sgtm"
    pkg.mkdir(parents=True)
    for f in ("__init__.py", "masking.py"):
        (pkg / f).write_text("")
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (pkg / "partition.py").write_text(stmt + "\n")
    edges = imports(modules(tmp_path / "pipeline"))
    assert ("pipeline.sgtm.partition", expected) in edges
