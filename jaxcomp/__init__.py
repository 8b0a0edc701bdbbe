"""jaxcomp: model compression for JAX/Flax.

Quantization (:mod:`jaxcomp.quant`), pruning (:mod:`jaxcomp.sparsity`) and
knowledge distillation (:mod:`jaxcomp.distill`) as pure functions over parameter
pytrees and optax transforms. Modules that need flax, orbax or optional extras
(``checkpoint``, ``data``, ``models``, ``train``, ``report``, ``cli``) load on
first access.
"""

import importlib

from jaxcomp import distill, quant, rules, sparsity

__version__ = "0.1.0"

_LAZY = ("checkpoint", "cli", "data", "demo", "models", "report", "train")

__all__ = ["__version__", "distill", "quant", "rules", "sparsity", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"jaxcomp.{name}")
    raise AttributeError(f"module 'jaxcomp' has no attribute {name!r}")
