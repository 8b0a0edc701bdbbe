"""Quantization: ``QArray``, quantize/dequantize, trees, fake quantization, QAT, matmuls."""

from jaxcomp.quant._act_quant import (
    fake_quant_activation,
    fake_quant_activations,
    fake_quant_dot_general,
)
from jaxcomp.quant._config import QuantConfig
from jaxcomp.quant._execution import quantized_apply, quantized_execution
from jaxcomp.quant._fake_quant import fake_quant
from jaxcomp.quant._lsq import lsq_fake_quant
from jaxcomp.quant._matmul import (
    fp8_dot_general,
    quantize_activations,
    w8a8_dot_general,
    weight_only_dot_general,
)
from jaxcomp.quant._native import NativeStatus, native_status
from jaxcomp.quant._prepack import prepack
from jaxcomp.quant._qarray import QArray
from jaxcomp.quant._qat import fake_quantize_tree, init_lsq_scales, lsq_quantize_tree
from jaxcomp.quant._quantize import dequantize, quantize
from jaxcomp.quant._tree import dequantize_tree, quantize_tree

__all__ = [
    "NativeStatus",
    "QArray",
    "QuantConfig",
    "dequantize",
    "dequantize_tree",
    "fake_quant",
    "fake_quant_activation",
    "fake_quant_activations",
    "fake_quant_dot_general",
    "fake_quantize_tree",
    "fp8_dot_general",
    "init_lsq_scales",
    "lsq_fake_quant",
    "lsq_quantize_tree",
    "native_status",
    "prepack",
    "quantize",
    "quantize_activations",
    "quantize_tree",
    "quantized_apply",
    "quantized_execution",
    "w8a8_dot_general",
    "weight_only_dot_general",
]
