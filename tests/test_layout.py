"""The package keeps its shape: stages import only earlier stages, no import cycles, short modules,
and the import paths that pushed model cards name still work. Reads the source; trains nothing."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_transfer"

# Each stage may import itself and the stages before it, never one after it. The order is the
# data's: a recipe names a source, data and a strategy; the loop trains the plan a task builds; the
# cache and domain adaptation turn a task's plan into another plan; export lays out the output
# folder that tasks write into and inference reads from; selection scores source models through the
# tasks' plans and the cache; optimize works on what inference loads; run and the CLI sit on top of
# everything, with strategy auto's ladder between them (it trains each rung with run's pieces, and
# the CLI dispatches to it).
STAGES = [
    "errors", "console", "recipe", "sources", "data", "training", "strategies", "cache", "export", "tasks",
    "adaptation", "selection", "inference", "optimize", "run", "ladder", "launch", "cli",
    "adapted_model", "multimodal", "predict",  # import paths pushed cards name: thin re-exports
]
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if ".venv" not in p.parts}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """hf_transfer modules imported anywhere in the file (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            if name.startswith("hf_transfer"):
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"  # the package's own __init__ re-exports the error type


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_every_module_belongs_to_a_stage():
    unplaced = sorted({stage(m) for m in package_modules()} - set(STAGES))
    assert not unplaced, f"modules outside the stage order (add them to STAGES in their place): {unplaced}"


def test_no_stage_imports_a_later_stage():
    upward = [
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        for target in targets
        if STAGES.index(stage(target)) > STAGES.index(stage(source))
    ]
    assert not upward, "imports that reach a later stage:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_modules_stay_short():
    long = {name: n for name, path in package_modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_import_paths_named_by_pushed_cards_still_work():
    # two-tower and domain-adapted cards, and image cards with a custom head, name these
    assert callable(importlib.import_module("hf_transfer.multimodal").load_two_tower)
    assert callable(importlib.import_module("hf_transfer.adapted_model").load_adapted_model)
    assert callable(importlib.import_module("hf_transfer.predict").load_saved_model)


def test_registries_cover_exactly_the_names_the_schema_accepts():
    import typing

    from hf_transfer.recipe import Recipe, StrategyConfig
    from hf_transfer.strategies import STRATEGIES
    from hf_transfer.tasks import TASKS

    def choices(cls: type, name: str) -> set[str]:
        return set(typing.get_args(typing.get_type_hints(cls)[name]))

    # auto is in the schema but is no Strategy: it is the search over them (hf_transfer/ladder/)
    assert set(STRATEGIES) == choices(StrategyConfig, "name") - {"auto"}
    assert set(TASKS) == choices(Recipe, "task")
