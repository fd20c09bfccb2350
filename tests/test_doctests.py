"""Docstring examples run as tests (as in einops' test_doctests_examples)."""

import doctest
import importlib
import pkgutil

import pytest

import tilegrad

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(tilegrad.__path__, prefix="tilegrad.")
    if not m.name.startswith("tilegrad.commands")
    and m.name
    not in ("tilegrad.__main__", "tilegrad.memory.resolve")  # the last: an alias that warns on import
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
