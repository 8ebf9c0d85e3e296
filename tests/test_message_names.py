"""Every API that the package's warning and error messages recommend exists.

The string literals of ``l2l_adversarial/`` (docstrings aside; an f-string's fixed parts
joined, each ``{...}`` as a placeholder) are read with ``ast``, and these references resolved:

* dotted ``l2l_adversarial.x.y`` names: imported and looked up;
* calls in backticks (``learner.meta_loss(...)``): each ``name(`` in the span resolves, on a
  learner class for ``learner.``/``adml.``/``maml.``, in ``torch``, the package or the builtins
  otherwise;
* calls on a learner or the package outside backticks (``learner.x(``, ``l2la.x(``,
  ``engines.x(``);
* ``README: 'heading'``: README.md has that heading.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import l2l_adversarial
from l2l_adversarial import engines
from l2l_adversarial.algorithms import ADML, MAML, MAMLAD, AdversarialQuerying

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "l2l_adversarial"

LEARNER_CLASSES = (MAML, ADML, MAMLAD, AdversarialQuerying)
OWNERS: dict[str, tuple[object, ...]] = {
    "learner": LEARNER_CLASSES,
    "adml": (ADML,),
    "maml": LEARNER_CLASSES,
    "l2la": (l2l_adversarial,),
    "l2l_adversarial": (l2l_adversarial,),
    "engines": (engines,),
    "torch": (torch,),
    "nn": (nn,),
    "model": (nn.Module,),
    "loss": (torch.Tensor,),
    "inputs": (torch.Tensor,),
}
"""What the first name of a dotted reference stands for in a message."""
CHECKED_UNQUOTED = ("learner", "adml", "maml", "l2la", "l2l_adversarial", "engines")
CALL = re.compile(r"(?<![\w.}])([A-Za-z_][\w.]*)\(")
DOTTED = re.compile(r"\bl2l_adversarial(?:\.\w+)+")
README = re.compile(r"README: '([^']+)'")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for index, statement in enumerate(body):
            if not (
                isinstance(statement, ast.Expr)
                and isinstance(statement.value, ast.Constant)
                and isinstance(statement.value.value, str)
            ):
                continue
            after_assignment = index > 0 and isinstance(
                body[index - 1], (ast.Assign, ast.AnnAssign)
            )
            if index == 0 or after_assignment:
                found.add(id(statement.value))
    return found


def message_strings() -> list[tuple[str, str]]:
    """``(where, text)`` for every string literal of the package but docstrings."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        skip = _docstrings(tree)
        inner: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                inner.update(id(part) for part in node.values)
                text = "".join(
                    part.value if isinstance(part, ast.Constant) else "{}" for part in node.values
                )
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", text))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in skip | inner
            ):
                found.append((f"{path.relative_to(REPO)}:{node.lineno}", node.value))
    return found


def resolves(reference: str) -> bool:
    """Whether ``a.b.c`` names something that exists (see the module docstring)."""
    head, *rest = reference.split(".")
    if head == "l2l_adversarial":
        for cut in range(len(rest), -1, -1):  # the longest importable module, then attributes
            try:
                found: object = importlib.import_module(".".join([head, *rest[:cut]]))
            except ImportError:
                continue
            return _lookup(found, rest[cut:])
        return False
    if head in OWNERS:
        return any(_lookup(owner, rest) for owner in OWNERS[head])
    return not rest and (hasattr(l2l_adversarial, head) or hasattr(builtins, head))


def _lookup(owner: object, names: list[str]) -> bool:
    for name in names:
        if not hasattr(owner, name):
            return False
        owner = getattr(owner, name)
    return True


def recommended_names(text: str) -> list[str]:
    names = DOTTED.findall(text)
    for span in re.findall(r"`([^`]+)`", text):
        if "(" in span:
            names += CALL.findall(span)
    names += [n for n in CALL.findall(text) if n.split(".")[0] in CHECKED_UNQUOTED]
    return names


def test_every_recommended_name_exists() -> None:
    checked, missing = 0, []
    headings = set(re.findall(r"^#+ (.+)$", (REPO / "README.md").read_text(), re.M))
    for where, text in message_strings():
        for name in recommended_names(text):
            checked += 1
            if not resolves(name):
                missing.append(f"{where}: {name}")
        for heading in README.findall(text):
            checked += 1
            if heading not in headings:
                missing.append(f"{where}: README heading {heading!r}")
    assert not missing, "messages recommend what does not exist:\n" + "\n".join(missing)
    assert checked >= 5  # the scan found the references it is meant to check


@pytest.mark.parametrize(
    ("text", "exists"),
    [
        ("call `learner.meta_loss(x, y, xq, yq)`", True),
        ("or `l2l_adversarial.engines.meta_step(learner, tasks, optimizer)`", True),
        ("see l2l_adversarial.attacks.Attack", True),
        ("call `learner.meta_step(tasks, optimizer)`", False),  # the old warning's advice
        ("try learner.meta_update(tasks)", False),
        ("use l2l_adversarial.engines.step", False),
        ("`l2la.ADML(model, lr)` or `PGD(eps=8 / 255)`", True),
    ],
)
def test_the_scan_tells_existing_names_from_missing_ones(text: str, exists: bool) -> None:
    names = recommended_names(text)
    assert names and all(resolves(n) for n in names) is exists


def test_the_name_only_swap_warning_names_the_meta_step_that_exists() -> None:
    source = (PACKAGE / "algorithms" / "base.py").read_text()
    assert "learner.meta_step(" not in source
    assert "l2l_adversarial.engines.meta_step(learner, tasks, optimizer)" in source
