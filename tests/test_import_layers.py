"""The import-layer contract (issue 27.5): every import in ``bigbatch/`` follows the layer list of
docs/design.md, and no import cycle exists.

The list is read from docs/design.md itself (the fenced block under "## Layers"), so the page and
the check cannot drift apart. Every import counts: module-level, inside a function or a method,
under ``if TYPE_CHECKING:``, ``importlib.import_module("bigbatch.…")`` with a literal name, and a
string constant that names a bigbatch module to import later (``"bigbatch.optim._fused.kernels:
launch_lamb"``, a ``FusedSpec.launch``). Rules:

* an import stays inside its own entry of the list (its package, or its file) or points to an
  entry on a line *below* its own (never up, never sideways to another entry of its line);
* the core (the lines under the ``---- core`` line) imports only the standard library, torch and
  numpy, and ``optim/`` also triton;
* no cycle among the modules (strongly connected components of the import graph), where only
  ``TYPE_CHECKING`` imports are left out;
* every module of ``bigbatch/`` is on a line of the list.

``ALLOWLIST`` names the violations that remain today while other work removes them (each with its
issue); an entry that no longer occurs is itself an error, so the list can only shrink.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"

ALLOWLIST: dict[str, str] = {}
"""Violation key → the issue that removes it. Empty it as the fixes land (a stale entry fails)."""

CORE_EXTERNAL = {"torch", "numpy"}
CORE_EXTRA = {"optim/": {"triton"}}  # optional GPU dependency, imported only on a fused step
_ENTRY = re.compile(r"^[A-Za-z_][\w.]*(/|\.py)$")


@dataclass(frozen=True)
class Import:
    """One import found in a file: ``src`` module imports ``dst`` (a bigbatch module, or the
    top-level name of an outside package when ``external``)."""

    src: str
    dst: str
    file: str
    line: int
    local: bool  # inside a function or method
    type_only: bool  # under ``if TYPE_CHECKING:``
    external: bool


@dataclass(frozen=True)
class Layers:
    lines: list[list[str]]  # top → bottom, each a list of entries ("optim/", "scaling.py")
    core_from: int  # index of the first core line

    def place(self, module: str, packages: set[str]) -> tuple[int, str] | None:
        """(line index, entry) of a module (``bigbatch.optim.lamb`` → the ``optim/`` line); ``packages``:
        the names that are packages (``bigbatch.optim``)."""
        parts = module.split(".")[1:]
        if not parts:
            key = "__init__.py"
        elif len(parts) == 1 and module not in packages:
            key = parts[0] + ".py"
        else:
            key = parts[0] + "/"
        for i, entries in enumerate(self.lines):
            if key in entries:
                return i, key
        return None


def parse_layers(text: str) -> Layers:
    """The layer list: the first fenced block after the "## Layers" heading of docs/design.md."""
    sec = text.split("## Layers", 1)[1]
    block = sec.split("```", 2)[1]
    lines, core_from = [], None
    for raw in block.strip("\n").splitlines():
        if raw.lstrip().startswith("---"):
            assert "core" in raw, f"the separator line must name the core: {raw!r}"
            for name in sorted(CORE_EXTERNAL | set().union(*CORE_EXTRA.values())):
                assert name in raw, f"the core line must list {name!r}, which this test allows: {raw!r}"
            core_from = len(lines)
            continue
        entries = []
        for tok in raw.split():
            if not _ENTRY.match(tok):
                break
            entries.append(tok)
        assert entries, f"a layer line must start with its entries (pkg/ or file.py): {raw!r}"
        lines.append(entries)
    assert core_from is not None, "the layer list has no '---- core' line"
    return Layers(lines, core_from)


def _modules(pkg: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(pkg.rglob("*.py")):
        parts = list(f.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def scan(pkg: Path) -> tuple[dict[str, Path], list[Import]]:
    """Every import of every module under the package directory ``pkg``."""
    mods = _modules(pkg)
    root_name = pkg.name
    found: list[Import] = []

    def resolve(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rpartition(".")[0]
        return name

    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        rel = str(path.relative_to(pkg.parent))

        def add(target: str, node: ast.AST, local: bool, type_only: bool) -> None:
            top = target.split(".")[0]
            if top == root_name:
                found.append(Import(mod, resolve(target), rel, node.lineno, local, type_only, False))
            elif top:
                found.append(Import(mod, top, rel, node.lineno, local, type_only, True))

        def visit(node: ast.AST, local: bool, type_only: bool) -> None:
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name, node, local, type_only)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")
                    up = up[: len(up) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    add(sub if sub in mods else base, node, local, type_only)
            elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)) and (
                    getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in (
                        "import_module", "__import__")):
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    add(node.args[0].value, node, local, type_only)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                name = node.value.partition(":")[0]
                if name.split(".")[0] == root_name and name in mods and re.fullmatch(r"[\w.]+(:[\w.]+)?", node.value):
                    add(name, node, local, type_only)
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    visit(child, local, True)
                for child in node.orelse:
                    visit(child, local, type_only)
                return
            inner = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                visit(child, inner, type_only)

        visit(tree, False, False)
    return mods, found


def _cycles(mods: dict[str, Path], imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over non-TYPE_CHECKING edges."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for im in imports:
        if not im.external and not im.type_only and im.dst != im.src:
            graph[im.src].add(im.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
            strong(v)
    return out


def check(pkg: Path, design_text: str, allow: dict[str, str]) -> list[str]:
    """The contract's violations under ``pkg`` (not in ``allow``), plus stale ``allow`` entries."""
    layers = parse_layers(design_text)
    mods, imports = scan(pkg)
    packages = {m for m, f in mods.items() if f.name == "__init__.py"}
    found: dict[str, str] = {}
    for m, path in mods.items():
        if layers.place(m, packages) is None:
            found[f"unplaced: {m}"] = (f"{path.relative_to(pkg.parent)} is on no line of docs/design.md's layer list "
                                       "(add its package or file there)")
    stdlib = set(sys.stdlib_module_names)
    for im in imports:
        src = layers.place(im.src, packages)
        if src is None:
            continue
        where = f"{im.file}:{im.line}"
        if im.external:
            if src[0] >= layers.core_from and im.dst not in stdlib | CORE_EXTERNAL | CORE_EXTRA.get(src[1], set()):
                found.setdefault(f"{im.src} -> {im.dst}", f"{where}: core module {im.src} imports {im.dst!r} "
                                 "(the core imports only the standard library, torch and numpy)")
            continue
        dst = layers.place(im.dst, packages)
        if dst is None or dst[1] == src[1] or dst[0] > src[0]:
            continue
        how = "up" if dst[0] < src[0] else "sideways"
        found.setdefault(f"{im.src} -> {im.dst}", (
            f"{where}: {im.src} ({src[1]}, layer line {src[0] + 1}) imports {im.dst} ({dst[1]}, line {dst[0] + 1}): "
            f"an import {how} the list; imports point down docs/design.md's layer list only"))
    for comp in _cycles(mods, imports):
        members = set(comp)
        edges = sorted({f"{im.file}:{im.line} {im.src} -> {im.dst}" for im in imports
                        if im.src in members and im.dst in members and not im.type_only and not im.external
                        and im.src != im.dst})
        found[f"cycle: {', '.join(comp)}"] = "import cycle among " + ", ".join(comp) + ":\n    " + "\n    ".join(edges)
    problems = [msg for key, msg in sorted(found.items()) if key not in allow]
    problems += [f"ALLOWLIST entry {key!r} no longer occurs: remove it ({why})"
                 for key, why in sorted(allow.items()) if key not in found]
    return problems


# ------------------------------------------------------------------------------------ tests
def test_bigbatch_imports_follow_the_layer_list():
    problems = check(ROOT / "bigbatch", DESIGN.read_text(), ALLOWLIST)
    assert not problems, "\n".join(problems)


def test_scan_counts_local_type_checking_and_named_imports():
    mods, imports = scan(ROOT / "bigbatch")
    edges = {(im.src, im.dst): im for im in imports if not im.external}
    # a function-local import (the fused path, imported on the first fused step)
    assert edges[("bigbatch.optim._base", "bigbatch.optim._fused")].local
    # a module-level one
    assert not edges[("bigbatch.optim.lamb", "bigbatch.optim._base")].local
    # a launch spec string names the module that a fused step imports
    assert ("bigbatch.optim.lamb", "bigbatch.optim._fused.kernels") in edges
    # an external import inside a function, in the core
    assert any(im.src == "bigbatch.optim._base" and im.dst == "triton" and im.local for im in imports)
    assert sum(im.local for im in imports) >= 20 and len(imports) >= 300, (len(imports), sum(im.local for im in imports))


def test_layer_list_places_every_line_and_the_core():
    layers = parse_layers(DESIGN.read_text())
    mods, _ = scan(ROOT / "bigbatch")
    packages = {m for m, f in mods.items() if f.name == "__init__.py"}

    def line(m):
        return layers.place(m, packages)[0]

    assert line("bigbatch.cli.train") < line("bigbatch.train.loop") < layers.core_from
    assert layers.core_from <= line("bigbatch.optim.lamb") < line("bigbatch._checks")
    assert line("bigbatch.scaling") < line("bigbatch.recipe") < line("bigbatch.optim") < line("bigbatch.rules")


def _planted(tmp_path: Path, edits: dict[str, str]) -> Path:
    pkg = tmp_path / "bigbatch"
    shutil.copytree(ROOT / "bigbatch", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, code in edits.items():
        f = pkg / rel
        f.write_text((f.read_text() if f.exists() else "") + "\n\n" + code + "\n")
    return pkg


def test_planted_back_import_inside_a_function_fails(tmp_path):
    # the core reaching up into the CLI, hidden inside a function
    pkg = _planted(tmp_path, {"optim/lars.py": "def _planted():\n    from bigbatch.cli import main\n    return main\n"})
    problems = check(pkg, DESIGN.read_text(), ALLOWLIST)
    assert len(problems) == 1, problems
    assert "bigbatch/optim/lars.py:" in problems[0] and "imports bigbatch.cli" in problems[0], problems
    assert "an import up the list" in problems[0]


def test_planted_sideways_import_and_core_third_party_import_fail(tmp_path):
    pkg = _planted(tmp_path, {
        "noise/estimator.py": "import rich\n",  # core: no rich
        "adaptive/ramp.py": "from bigbatch.averaging import EMA\n",  # adaptive/ is above averaging/: allowed
        "averaging/ema.py": "def _x():\n    import bigbatch.adaptive.ramp\n",  # averaging/ up to adaptive/
    })
    problems = check(pkg, DESIGN.read_text(), ALLOWLIST)
    assert any("noise/estimator.py" in p and "'rich'" in p for p in problems), problems
    assert any("bigbatch/averaging/ema.py:" in p and "imports bigbatch.adaptive.ramp" in p for p in problems), problems
    assert not any("adaptive/ramp.py" in p and "imports bigbatch.averaging" in p for p in problems), problems


def test_planted_cycle_fails_unless_type_checking(tmp_path):
    # data/masks.py <-> data/packing.py: allowed by the layers (one package), a cycle all the same
    back = "def _planted():\n    from bigbatch.data import packing\n    return packing\n"
    pkg = _planted(tmp_path / "a", {"data/masks.py": back, "data/packing.py": "from bigbatch.data import masks\n"})
    problems = check(pkg, DESIGN.read_text(), ALLOWLIST)
    assert len(problems) == 1 and problems[0].startswith("import cycle among bigbatch.data.masks, bigbatch.data.packing"), problems
    assert "bigbatch/data/masks.py:" in problems[0]
    typed = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bigbatch.data import packing\n"
    pkg = _planted(tmp_path / "b", {"data/masks.py": typed, "data/packing.py": "from bigbatch.data import masks\n"})
    assert check(pkg, DESIGN.read_text(), ALLOWLIST) == []


def test_unplaced_module_and_stale_allowlist_entry_fail(tmp_path):
    pkg = _planted(tmp_path, {"newthing.py": "X = 1\n"})
    problems = check(pkg, DESIGN.read_text(), {**ALLOWLIST, "bigbatch.data.masks -> bigbatch.cli": "gone"})
    assert any("bigbatch/newthing.py is on no line" in p for p in problems), problems
    assert any("ALLOWLIST entry 'bigbatch.data.masks -> bigbatch.cli' no longer occurs" in p for p in problems), problems


def test_allowlist_entries_name_their_issue():
    for key, why in ALLOWLIST.items():
        assert re.match(r"issue \d+(\.\d+)?: ", why), (key, why)
