"""The package's shape: learners declare what they are, and the import graph has no circle and
keeps its layers (data, envs and models know no algorithm; algorithms know no loop; records know
no algorithm; nothing below the CLI imports the CLI or the tools)."""

import ast
import dataclasses
from pathlib import Path

import pytest

from metalearn.algos import ALGOS
from metalearn.algos.learner import AlgoConfig, Learner

PACKAGE = Path(__file__).resolve().parents[1] / "metalearn"


def test_every_registered_learner_and_config_declares_what_it_is():
    """A Learner's declarations are checked when its class is defined (the test below); its
    config answers build.py and the trainer through AlgoConfig's methods, never a probed field."""
    for name, (config_cls, cls) in ALGOS.items():
        assert issubclass(cls, Learner), name
        assert issubclass(config_cls, AlgoConfig), name
        assert not set(vars(AlgoConfig)) & {f.name for f in dataclasses.fields(config_cls)}, name


def test_a_learner_that_leaves_a_capability_undeclared_fails_when_defined():
    with pytest.raises(TypeError, match="must declare .*batches_tasks"):

        class Half(Learner):  # everything but batches_tasks
            family, pretrains, needs_train_classes, needs_ways = "metric", False, False, False
            needs_head, reinforcement, differentiates_inner_loop = False, False, False
            inner_loop, first_order_switch, checkpoint_switch = False, False, False
            outer_schedule, compiled, optimizees = "constant", "meta_loss", False


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The metalearn modules a module imports when it runs (anywhere in it, functions included),
    leaving out `if TYPE_CHECKING:` blocks, which only type checkers read."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("metalearn"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("metalearn"):
            for alias in node.names:  # `from metalearn.records import checkpoint`: a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) & set(MODULES) for name, path in MODULES.items()}


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_import_graph_has_no_circle():
    state: dict[str, str] = {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                circle = path[path.index(nxt) :] + [nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            walk(node, [node])


FORBIDDEN = {  # importer -> what it must not import
    ("metalearn.data", "metalearn.envs", "metalearn.models", "metalearn.optim"): (
        "metalearn.algos",
        "metalearn.train",
        "metalearn.records",
        "metalearn.build",
    ),
    ("metalearn.algos",): ("metalearn.train", "metalearn.records", "metalearn.build"),
    ("metalearn.records",): ("metalearn.algos",),
}


@pytest.mark.parametrize("importers", list(FORBIDDEN), ids=lambda p: "+".join(p))
def test_lower_layers_never_import_higher_ones(importers: tuple[str, ...]):
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if within(module, *importers)
        for target in targets
        if within(target, *FORBIDDEN[importers])
    )
    assert not bad, bad


def test_nothing_below_the_cli_imports_the_cli_or_the_tools():
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if not within(module, "metalearn.cli", "metalearn.tools")
        for target in targets
        if within(target, "metalearn.cli", "metalearn.tools")
    )
    assert not bad, bad


def test_functions_and_modules_stay_small_or_say_why():
    """About 50 lines a function (60 at most) and 300 a module, unless its docstring says why."""
    long_functions, long_modules = [], []
    for name, path in MODULES.items():
        text = path.read_text()
        tree = ast.parse(text)
        lines = len(text.splitlines())
        if lines > 300 and "Over 300 lines because" not in (ast.get_docstring(tree) or ""):
            long_modules.append(f"{name}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert not long_modules and not long_functions, long_modules + long_functions
