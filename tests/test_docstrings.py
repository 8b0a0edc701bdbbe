"""Every docstring example in the package runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import jax
import pytest

import jaxcomp

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(jaxcomp.__path__, "jaxcomp.") if m.name != "jaxcomp.cli"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    with jax.numpy_dtype_promotion("standard"):  # examples show user code, not test strictness
        result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
