"""The package's shape: no import cycles, Flower's import boundary, module size.

The import graph is read from the source with ``ast`` (every ``import`` and
``from ... import`` of an ``adaquantfl`` module, at module level or inside a
function: a lazy import is still a dependency), so a cycle is found even where
Python would happen to tolerate it at run time.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "adaquantfl"
#: "Nothing near 800 lines" (DESIGN §3): a module is one concept, whatever its
#: size, but one this long is several.
MAX_MODULE_LINES = 800
#: What the Flower integration may depend on, directly or not (DESIGN §3).
FLOWER_FORBIDDEN = ("adaquantfl.runner", "adaquantfl.data", "adaquantfl.sim", "adaquantfl.cli")


def module_files() -> dict[str, Path]:
    """Module name -> source file, for every module of the package."""
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.module, node.level)
                # `from pkg import sub` depends on pkg.sub when that is a module.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import a.b.c` -> nearest module
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _resolve(module: str, is_package: bool, target: str | None, level: int) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        v = todo.pop()
        for w in graph.get(v, ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files())


def test_the_graph_sees_the_package(graph: dict[str, set[str]]) -> None:
    # A walker that found nothing would pass every test below.
    assert "adaquantfl.compression.codec" in graph
    assert "adaquantfl.compression.container" in graph["adaquantfl.compression.codec"]
    assert "adaquantfl.compression._kernels" in graph["adaquantfl.compression.qsgd"]  # lazy


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle(graph: dict[str, set[str]]) -> None:
    planted = {k: set(v) for k, v in graph.items()}
    planted["adaquantfl.compression.container"].add("adaquantfl.compression.codec")
    pair = {"adaquantfl.compression.codec", "adaquantfl.compression.container"}
    assert any(pair <= set(component) for component in cycles(planted))


@pytest.mark.parametrize(
    "module", sorted(m for m in module_files() if m.startswith("adaquantfl.flower"))
)
def test_flower_imports_only_the_algorithm(graph: dict[str, set[str]], module: str) -> None:
    bad = sorted(m for m in reachable(graph, module) if m.startswith(FLOWER_FORBIDDEN))
    assert bad == [], f"{module} depends on {bad}"


def test_importing_the_flower_strategy_loads_no_runner_data_or_simulator() -> None:
    code = (
        "import sys, adaquantfl.flower.strategy; "
        f"print(sorted(m for m in sys.modules if m.startswith({FLOWER_FORBIDDEN!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def oversized(modules: dict[str, Path], limit: int) -> list[str]:
    """``"module (N lines)"`` for every module longer than ``limit`` lines, longest first."""
    sizes = {
        name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules.items()
    }
    return [
        f"{name} ({n} lines)"
        for name, n in sorted(sizes.items(), key=lambda kv: -kv[1])
        if n > limit
    ]


def test_no_module_is_over_the_line_limit() -> None:
    modules = module_files()
    assert len(modules) > 10  # a walker that found nothing would pass
    bad = oversized(modules, MAX_MODULE_LINES)
    assert bad == [], f"over {MAX_MODULE_LINES} lines, split by concept: {', '.join(bad)}"


def test_the_line_limit_names_every_offender() -> None:
    # The control: at a limit of 0 lines every non-empty module is an offender,
    # and each is named once, the longest first.
    modules = module_files()
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in modules.items()}
    bad = oversized(modules, 0)
    assert sorted(entry.split(" ")[0] for entry in bad) == sorted(m for m, n in sizes.items() if n)
    assert bad[0] == f"{max(sizes, key=sizes.__getitem__)} ({max(sizes.values())} lines)"


def test_the_design_import_paths_are_the_subpackages_objects() -> None:
    # DESIGN §7's paths stay thin re-exports of the modules that implement them.
    import adaquantfl.codec
    import adaquantfl.compression.codec
    import adaquantfl.compression.qsgd
    import adaquantfl.policy
    import adaquantfl.quantize
    import adaquantfl.schedule

    for old, new in [
        (adaquantfl.quantize, adaquantfl.compression.qsgd),
        (adaquantfl.codec, adaquantfl.compression.codec),
        (adaquantfl.schedule, adaquantfl.policy),
    ]:
        assert old.__all__ == new.__all__ and old.__all__
        assert all(getattr(old, name) is getattr(new, name) for name in new.__all__)
    for name in ("quantize", "dequantize", "Quantized"):
        assert name in adaquantfl.quantize.__all__
    for name in ("encode", "decode", "CodecError"):
        assert name in adaquantfl.codec.__all__
    for name in ("FixedLevels", "AdaQuantLevels"):
        assert name in adaquantfl.schedule.__all__


def test_the_package_offers_its_entry_points_by_name() -> None:
    import adaquantfl

    assert set(adaquantfl.__all__) == {
        "COMPRESSORS", "POLICIES", "FedServer", "Simulator", "__version__",
        "compare", "load_config", "make_compressor", "make_policy", "run",
    }  # fmt: skip
    for name in adaquantfl.__all__:
        assert getattr(adaquantfl, name) is not None
    assert adaquantfl.make_compressor is adaquantfl.compression.make_compressor
    assert adaquantfl.POLICIES is adaquantfl.policy.POLICIES
    # Nothing else but its subpackages: no stray names of the modules it imports.
    strays = [
        n
        for n, v in vars(adaquantfl).items()
        if not n.startswith("_") and n not in adaquantfl.__all__ and not inspect.ismodule(v)
    ]
    assert strays == []
    with pytest.raises(AttributeError, match="no attribute 'Any'"):
        adaquantfl.Any  # noqa: B018


def test_import_adaquantfl_loads_no_torch() -> None:
    # The entry points are imported on first use, so a CLI's --help stays fast.
    code = "import adaquantfl, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
