"""The docstring examples of jaxcomp.sparsity run and print what they show."""

import doctest
import importlib

import pytest

MODULES = ["_allocation", "_compute", "_masks", "_optax", "_schedules", "_summary"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"jaxcomp.sparsity.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
