"""The architecture, checked from the code's own imports (docs/architecture.md).

Every ``import`` statement of the two packages is read with :mod:`ast`, including imports
inside functions (a lazy import is still a dependency) and excluding ``if TYPE_CHECKING:``
blocks (annotations only). A module's edge goes to the module it names, not to its parent
packages, as import-linter counts them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("imrnns_kernels", "imrnns")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    tree: ast.AST, module: str, is_package: bool, modules: set[str]
) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import outside TYPE_CHECKING blocks.
    ``from a.b import c`` names the module ``a.b.c`` when that is a module, else ``a.b``."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".")
                    if not is_package:
                        anchor = anchor[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in modules else base, top))
            nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, top and not nested)

    visit(tree, True)
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]], set[str]]:
    """(all edges, module-level edges, external top-level names) between project modules."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    top_edges: dict[str, set[str]] = {m: set() for m in files}
    external: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for name, top in _imports(tree, mod, path.name == "__init__.py", set(files)):
            if name in files and name != mod:
                edges[mod].add(name)
                if top:
                    top_edges[mod].add(name)
            elif name.split(".")[0] not in PACKAGES:
                external[mod].add(name.split(".")[0] + (":top" if top else ""))
    return edges, top_edges, external  # type: ignore[return-value]


EDGES, TOP_EDGES, EXTERNAL = _graph()


def _reach(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _is_cli(mod: str) -> bool:
    return mod == "imrnns.cli" or mod.startswith("imrnns.cli.") or mod == "imrnns.__main__"


def _is_triton_module(mod: str) -> bool:
    return mod.split(".")[-1] == "triton"


def test_the_graph_was_read() -> None:
    # A broken reader would make every test below pass vacuously.
    assert len(EDGES) > 40
    assert "imrnns.model" in EDGES and any(
        e.startswith("imrnns_kernels") for e in EDGES["imrnns.model"]
    )


def test_kernels_never_import_the_library() -> None:
    bad = {
        m: sorted(e for e in edges if e.split(".")[0] == "imrnns")
        for m, edges in EDGES.items()
        if m.startswith("imrnns_kernels")
    }
    assert not {m: e for m, e in bad.items() if e}


def test_no_cpu_path_module_imports_triton() -> None:
    """Only the Triton launch modules import triton; nothing else reaches them at import time."""
    kernel_modules = [m for m in EDGES if m.startswith("imrnns_kernels")]
    assert any(_is_triton_module(m) for m in kernel_modules)
    offenders = {}
    for mod in kernel_modules:
        if _is_triton_module(mod):
            continue
        direct = {x for x in EXTERNAL[mod] if x.split(":")[0] == "triton"}
        reached = sorted(m for m in _reach(mod, TOP_EDGES) if _is_triton_module(m))
        if direct or reached:
            offenders[mod] = (sorted(direct), reached)
    assert not offenders


def test_nothing_below_the_command_line_imports_it() -> None:
    bad = {
        m: sorted(e for e in edges if _is_cli(e)) for m, edges in EDGES.items() if not _is_cli(m)
    }
    assert not {m: e for m, e in bad.items() if e}


def test_no_import_cycles() -> None:
    """Strongly connected components of size > 1, counting lazy imports, must not exist."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:  # Tarjan, recursion depth = module count (small)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in EDGES[v]:
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
                comps.append(sorted(comp))

    for v in sorted(EDGES):
        if v not in index:
            strong(v)
    assert not comps, comps


@pytest.mark.parametrize(
    "heavy", ["faiss", "transformers", "sentence_transformers", "triton", "matplotlib"]
)
def test_the_library_core_does_not_import_heavy_packages_at_import_time(heavy: str) -> None:
    """``import imrnns`` and ``import imrnns_kernels`` stay light: heavy packages load inside
    the functions that need them (faiss in the index, transformers in the encoders)."""
    for root in ("imrnns", "imrnns_kernels"):
        reached = {root} | _reach(root, TOP_EDGES)
        users = sorted(
            m
            for m in reached
            if heavy in {x.split(":")[0] for x in EXTERNAL[m] if x.endswith(":top")}
        )
        assert not users, (root, heavy, users)


def test_the_command_line_starts_without_torch() -> None:
    """``imrnns --help`` stays fast: building the parser imports no torch, faiss,
    transformers, sentence-transformers or triton (each command imports what it needs when
    it runs)."""
    import subprocess
    import sys

    code = (
        "import sys, imrnns.cli\n"
        "from imrnns.cli import build_parser\n"
        "build_parser()\n"
        "heavy = [m for m in ('torch', 'faiss', 'transformers', 'sentence_transformers', "
        "'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
