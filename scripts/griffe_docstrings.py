"""A griffe extension for the API reference (mkdocs.yml): reads the package's docstrings as
mkdocstrings' Google style expects, without changing them in the source.

* ``Example:`` (the package's heading for doctest examples) becomes ``Examples:``, the heading
  griffe parses as examples; otherwise the ``>>>`` lines would be rendered as Markdown.
* Sphinx roles (``:class:`~pkg.mod.Name```, ``:func:`pkg.f```, ...) become inline code
  (```Name```, ```pkg.f```), as Sphinx would show them.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

EXAMPLE_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.M)
ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    target = match[2]
    return f"`{target.rsplit('.', 1)[-1] if match[1] else target}`"


def rewrite(text: str) -> str:
    return ROLE.sub(_role, EXAMPLE_HEADING.sub(r"\1Examples:", text))


class PackageDocstrings(Extension):
    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
