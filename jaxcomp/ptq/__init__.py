"""Post-training compression: capture, GPTQ, AWQ, SmoothQuant, SparseGPT, Wanda, model drivers."""

from jaxcomp.ptq._awq import awq
from jaxcomp.ptq._capture import (
    LayerStats,
    accumulate,
    capture_stats,
    init_stats,
    mean_hessian,
    psum_stats,
)
from jaxcomp.ptq._driver import GPTQConfig, SparseGPTConfig, WandaConfig, compress_model
from jaxcomp.ptq._fold import Fold, fold_scales
from jaxcomp.ptq._gptq import gptq
from jaxcomp.ptq._smooth import AWQConfig, awq_model, smoothquant_model, smoothquant_scales
from jaxcomp.ptq._sparsegpt import sparsegpt
from jaxcomp.ptq._wanda import wanda

__all__ = [
    "AWQConfig",
    "Fold",
    "GPTQConfig",
    "LayerStats",
    "SparseGPTConfig",
    "WandaConfig",
    "accumulate",
    "awq",
    "awq_model",
    "capture_stats",
    "compress_model",
    "fold_scales",
    "gptq",
    "init_stats",
    "mean_hessian",
    "psum_stats",
    "smoothquant_model",
    "smoothquant_scales",
    "sparsegpt",
    "wanda",
]
