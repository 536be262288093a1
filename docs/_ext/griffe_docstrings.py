"""Griffe extension for the API reference: read snpatch's docstrings as their source writes them.

snpatch's docstrings are Google style with two habits the Google parser does not know: an
``Example:`` section (Griffe reads only ``Examples:`` as one, and renders ``Example:`` as an
admonition whose ``>>>`` lines become nested block quotes), and Sphinx roles such as
``:func:`update_sigma``` (Markdown shows them literally). This rewrites both on the docstring
text before it is parsed; the source stays as it is, and so do its doctests.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|data|mod|attr|exc|obj):`~?([^`]+)`")


class SphinxHabits(griffe.Extension):
    """``Example:`` becomes ``Examples:``, ``:role:`name``` becomes ```name```."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        text = _EXAMPLE.sub(r"\1Examples:", docstring.value)
        docstring.value = _ROLE.sub(r"`\1`", text)
