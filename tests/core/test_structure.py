"""The package's shape: imports flow srt -> core -> kernels, no cycles, the core runs without SGLang.

The core is everything outside `srt/` (SGLang glue) and `dev/` (test and benchmark harness):
the launch rules (`rules/`), the planner (`plan.py`, `perf/`) and the attention math included.

Static checks read the source with ast (every import statement, at module level or inside a
function); the runtime check imports every core module in a fresh interpreter in which
`import sglang` fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "sglang_helix"
# The design card's layout: kernel sources in the top-level kernels/, installed as
# sglang_helix.kernels (pyproject's package-dir), never as a top-level package `kernels`.
KERNELS = ROOT / "kernels"
MAX_LINES = 450


def _package_modules(directory: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in directory.rglob("*.py"):
        parts = (package, *path.relative_to(directory).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _modules() -> dict[str, Path]:
    return {**_package_modules(PKG, "sglang_helix"), **_package_modules(KERNELS, "sglang_helix.kernels")}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module `name` imports (package-internal resolution included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _internal_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {m for m in _imports(name, path) if m in MODULES and m != name}
    return graph


def _is_core(name: str) -> bool:
    return not (name.startswith("sglang_helix.srt") or name.startswith("sglang_helix.dev"))


# the one core module allowed to import dev/: the demo runs the dev server harness
CORE_EDGE_IMPORTING_DEV = ("sglang_helix.demo",)


def test_no_import_cycles():
    graph = _internal_graph()
    # a package's __init__ importing its own submodules is not a cycle of responsibilities
    graph = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")}
             for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in graph[node]:
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, cycles


def test_sglang_is_imported_only_under_srt():
    offenders = {name: sorted(m for m in _imports(name, path) if m == "sglang" or m.startswith("sglang."))
                 for name, path in MODULES.items() if not name.startswith("sglang_helix.srt")}
    assert not {k: v for k, v in offenders.items() if v}


def test_core_never_imports_srt_or_dev():
    graph = _internal_graph()
    bad = {m: sorted(d for d in deps if not _is_core(d) and not (
               m in CORE_EDGE_IMPORTING_DEV and d.startswith("sglang_helix.dev")))
           for m, deps in graph.items() if _is_core(m)}
    assert not {k: v for k, v in bad.items() if v}


def test_launch_rules_are_core_and_the_glue_decides_nothing_itself():
    """Every launch rule lives in the core package `rules/`; srt/resolution.py only reads
    SGLang's settings and calls it: it raises nothing itself."""
    assert _is_core("sglang_helix.rules.whole_launch")
    glue = MODULES["sglang_helix.srt.resolution"]
    assert not [node for node in ast.walk(ast.parse(glue.read_text())) if isinstance(node, ast.Raise)]
    assert "sglang_helix.rules" in _imports("sglang_helix.srt.resolution", glue)


def test_kernels_import_no_other_part_of_the_package():
    graph = _internal_graph()
    bad = {m: sorted(d for d in deps if not d.startswith("sglang_helix.kernels"))
           for m, deps in graph.items() if m.startswith("sglang_helix.kernels")}
    assert not {k: v for k, v in bad.items() if v}


# The size rule covers the package and the repository's benchmarks and scripts.
SIZED = {**MODULES, **{str(p.relative_to(ROOT)): p for d in ("benchmarks", "scripts")
                             for p in (PKG.parent / d).rglob("*.py")}}


@pytest.mark.parametrize("name", sorted(SIZED))
def test_module_size(name):
    lines = len(SIZED[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines > {MAX_LINES}; split it by responsibility"


def test_core_imports_without_sglang():
    core = sorted(m for m in MODULES if _is_core(m))
    code = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'sglang' or name.startswith('sglang.'):\n"
        "            raise ImportError('sglang is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
        "assert not [m for m in sys.modules if m == 'sglang' or m.startswith('sglang.')]\n"
        "print('OK')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_kernels_sit_at_the_top_level_and_install_under_the_package():
    import tomllib

    assert (KERNELS / "__init__.py").is_file() and not (PKG / "kernels").exists()
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"]["sglang_helix.kernels"] == "kernels"
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert set(tool["packages"]) == packages  # every package directory is installed
    import sglang_helix.kernels as kernels

    assert Path(kernels.__file__).resolve().parent == KERNELS
