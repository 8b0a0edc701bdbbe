"""Small reference Flax models for examples, tests and benchmarks."""

from jaxcomp.models._classifiers import CNN, HINTON_SIZES, MLP, NNXMLP, build_model, init_params
from jaxcomp.models._gpt import GPT, GPTConfig

__all__ = [
    "CNN",
    "GPT",
    "GPTConfig",
    "HINTON_SIZES",
    "MLP",
    "NNXMLP",
    "build_model",
    "init_params",
]
