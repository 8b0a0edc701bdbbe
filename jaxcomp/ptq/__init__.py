"""Post-training compression: layer-input capture, GPTQ, SparseGPT, Wanda and model drivers."""

from jaxcomp.ptq._capture import (
    LayerStats,
    accumulate,
    capture_stats,
    init_stats,
    mean_hessian,
    psum_stats,
)
from jaxcomp.ptq._driver import GPTQConfig, SparseGPTConfig, WandaConfig, compress_model
from jaxcomp.ptq._gptq import gptq
from jaxcomp.ptq._sparsegpt import sparsegpt
from jaxcomp.ptq._wanda import wanda

__all__ = [
    "GPTQConfig",
    "LayerStats",
    "SparseGPTConfig",
    "WandaConfig",
    "accumulate",
    "capture_stats",
    "compress_model",
    "gptq",
    "init_stats",
    "mean_hessian",
    "psum_stats",
    "sparsegpt",
    "wanda",
]
