"""The map in the README holds: no import cycles, arrows one way, small modules with a stated job."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("updatestore", "unlearn", "benchmarks")


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


MODULES = dict(_modules())


def _imports(name: str, path: Path) -> set[str]:
    """Project modules that ``name`` imports at module level (function-level imports are lazy by design)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in tree.body:
        nodes = [node] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not imports at run time
            continue
        for n in nodes:
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            else:
                base = n.module or ""
                if n.level:
                    anchor = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in n.names]
            out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in GRAPH[node]:
            # a package importing its own submodules (re-exports) is not a cycle through them
            if state.get(nxt) == 1 and not nxt.startswith(node + "."):
                cycle = stack[stack.index(nxt):] + [nxt]
                if not any(b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if state.get(nxt) is None:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in GRAPH:
        if node not in state:
            visit(node, [node])


def test_arrows_point_one_way():
    """benchmarks -> unlearn -> updatestore; unlearn and benchmarks use updatestore's public API only."""
    for name, deps in GRAPH.items():
        if name.startswith("updatestore"):
            assert not any(d.startswith(("unlearn", "benchmarks")) for d in deps), (name, deps)
        if name.startswith("unlearn"):
            assert not any(d.startswith("benchmarks") for d in deps), (name, deps)
            private = [d for d in deps if d.startswith("updatestore") and re.search(r"\._", d)]
            assert not private, f"{name} reaches updatestore internals: {private}"


def test_modules_are_small_and_say_their_job():
    for name, path in MODULES.items():
        lines = path.read_text().count("\n")
        assert lines <= 400, f"{path.relative_to(ROOT)} has {lines} lines: does it hold two jobs?"
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip(), f"{path.relative_to(ROOT)} has no docstring saying its job"
    assert (ROOT / "updatestore" / "store.py").read_text().count("\n") < 300  # the facade stays thin


def test_public_names_are_exported():
    import unlearn
    import updatestore

    for mod in (updatestore, unlearn):
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.__all__ lists {name!r}, which does not exist"


def test_importing_the_package_imports_no_training_framework():
    """Integrations import their framework only when imported themselves."""
    import subprocess
    import sys

    code = ("import sys, updatestore, unlearn, updatestore.integrations; "
            "print([m for m in ('lightning', 'pytorch_lightning', 'transformers', 'peft') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
