"""The package's layers point down: each module imported alone in a fresh interpreter loads
nothing from the layers above it, and no two modules import each other (directly or not).

Two products: the library (``l2l_adversarial``: attacks <- algorithms <- engines <-
evaluation; data and transforms feed tasks in) and the application that reproduces the paper
(``l2l_adversarial.app``: config, factory <- training, report <- cli), which the library
never imports.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "l2l_adversarial"

APP = "l2l_adversarial.app"
LIBRARY = sorted(
    name
    for name in (
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for path in PACKAGE.rglob("*.py")
    )
    if name != APP and not name.startswith(APP + ".") and not name.endswith("__main__")
)
"""Every module of the library: the package outside ``l2l_adversarial.app``."""

# In layer order: what is loaded after importing a module (and the ones before it, which are
# lower) cannot have been loaded by it alone either.
FORBIDDEN = {
    "l2l_adversarial.algorithms": [
        "l2l_adversarial.engines", "l2l_adversarial.evaluation", "l2l_adversarial.data",
        "l2l_adversarial.transforms", APP,
    ],
    "l2l_adversarial.transforms": ["l2l_adversarial.engines", "l2l_adversarial.evaluation", APP],
    "l2l_adversarial.engines": ["l2l_adversarial.evaluation", "l2l_adversarial.data", APP],
    "l2l_adversarial.app.factory": [
        "matplotlib", "l2l_adversarial.app.report", "l2l_adversarial.app.training",
        "l2l_adversarial.app.cli",
    ],
    "l2l_adversarial.app.training": [
        "matplotlib", "l2l_adversarial.app.report", "l2l_adversarial.app.cli",
    ],
}  # fmt: skip
LOWER_LAYERS = {
    "l2l_adversarial.task": ["l2l_adversarial.attacks", "l2l_adversarial.algorithms"],
    "l2l_adversarial.seeding": ["l2l_adversarial.task", "l2l_adversarial.attacks"],
    "l2l_adversarial.validation": ["l2l_adversarial.attacks", "l2l_adversarial.algorithms"],
    "l2l_adversarial.attacks": ["l2l_adversarial.algorithms", "l2l_adversarial.engines"],
    "l2l_adversarial.transforms": ["l2l_adversarial.algorithms", "l2l_adversarial.engines"],
    "l2l_adversarial.runtime.layouts": [
        "l2l_adversarial.attacks",
        "l2l_adversarial.algorithms",
        "l2l_adversarial.engines",
        "l2l_adversarial.evaluation",
        APP,
    ],
}
"""Modules the package's ``__init__`` loads anyway: checked on their own import statements."""


@pytest.fixture(scope="module")
def loaded_after() -> dict[str, set[str]]:
    """In one fresh interpreter: the modules held after importing each of FORBIDDEN in turn."""
    script = (
        "import importlib, json, sys\n"
        f"loaded = {{}}\nfor name in {list(FORBIDDEN)!r}:\n"
        "    importlib.import_module(name)\n    loaded[name] = sorted(sys.modules)\n"
        "print(json.dumps(loaded))"
    )
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    return {name: set(modules) for name, modules in json.loads(output.splitlines()[-1]).items()}


@pytest.mark.parametrize("module", list(FORBIDDEN))
def test_a_module_loads_nothing_from_the_layers_above(
    module: str, loaded_after: dict[str, set[str]]
) -> None:
    pulled = sorted(
        forbidden
        for forbidden in FORBIDDEN[module]
        if any(n == forbidden or n.startswith(forbidden + ".") for n in loaded_after[module])
    )
    assert not pulled, f"importing {module} loads {pulled}"


@pytest.mark.parametrize("module", list(LOWER_LAYERS))
def test_lower_layers_import_nothing_above_them(module: str) -> None:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    imported = imports_of(paths[module], set(paths))
    pulled = sorted(
        name
        for name in imported
        for above in LOWER_LAYERS[module]
        if name == above or name.startswith(above + ".")
    )
    assert not pulled, f"{module} imports {pulled}"


def test_the_library_never_imports_the_application() -> None:
    """Each library module alone, in a fresh interpreter: nothing of ``l2l_adversarial.app``
    is loaded (the application is built on the library, never the other way)."""
    script = (
        "import importlib, sys\n"
        f"for name in {LIBRARY!r}:\n"
        "    importlib.import_module(name)\n"
        f"    pulled = sorted(m for m in sys.modules if m == {APP!r} or m.startswith({APP!r} + '.'))\n"
        "    assert not pulled, f'importing {name} loads {pulled}'\n"
        "print(len(" + repr(LIBRARY) + "))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 20  # the library's modules were all imported


CONCRETE = {
    "l2l_adversarial.algorithms": {"ADML", "MAML", "MAMLAD", "RMAML", "AdversarialQuerying", "MatchingNetwork"},
    "l2l_adversarial.attacks": {"FGSM", "FFGSM", "PGD"},
    "l2l_adversarial.autoattack": {"AutoAttack"},
}  # fmt: skip
"""Concrete learners and attacks: only the application's factory maps names to them."""


def imported_names(path: Path) -> set[str]:
    """``module.name`` for every ``from module import name`` in ``path`` (any depth)."""
    tree = ast.parse(path.read_text())
    return {
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }


RUNNERS = [*sorted((PACKAGE / "runtime").glob("*.py")), PACKAGE / "evaluation.py",
           PACKAGE / "app" / "training.py", PACKAGE / "app" / "meta_validation.py"]  # fmt: skip
"""The runtime, evaluation and training: they see capabilities, never concrete classes."""


@pytest.mark.parametrize("path", RUNNERS, ids=lambda p: p.stem)
def test_the_runtime_imports_no_concrete_algorithm_or_attack(path: Path) -> None:
    names = imported_names(path)
    modules = imports_of(path, {module_name(p) for p in PACKAGE.rglob("*.py")})
    concrete = sorted(
        name
        for name in names
        for module, classes in CONCRETE.items()
        if name.startswith(module + ".") and name.rsplit(".", 1)[1] in classes
    ) + sorted(m for m in modules if m.startswith("l2l_adversarial.algorithms.") and
               m.rsplit(".", 1)[1] not in ("base", "task_ops"))  # fmt: skip
    assert not concrete, f"{path.name} imports {concrete}"


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "algorithms").glob("*.py")), ids=lambda p: p.stem
)
def test_algorithms_import_no_runtime(path: Path) -> None:
    modules = imports_of(path, {module_name(p) for p in PACKAGE.rglob("*.py")})
    runtime = ("l2l_adversarial.runtime", "l2l_adversarial.engines", "l2l_adversarial.evaluation")
    pulled = sorted(m for m in modules if m.startswith(runtime))
    assert not pulled, f"{path.name} imports {pulled}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & modules


def test_no_import_cycle() -> None:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: imports_of(path, set(paths)) - {name} for name, path in paths.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for name in graph:
        graph[name] = {
            target for target in graph[name] if not (name.startswith(target + ".") and target)
        }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
