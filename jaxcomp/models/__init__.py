"""Small reference Flax models for examples, tests and benchmarks."""

from jaxcomp.models._classifiers import CNN, HINTON_SIZES, MLP, NNXMLP, build_model, init_params

__all__ = ["CNN", "HINTON_SIZES", "MLP", "NNXMLP", "build_model", "init_params"]
