"""Quantization: ``QArray``, quantize/dequantize, quantized trees and fake quantization."""

from jaxcomp.quant._config import QuantConfig
from jaxcomp.quant._fake_quant import fake_quant
from jaxcomp.quant._lsq import lsq_fake_quant
from jaxcomp.quant._qarray import QArray
from jaxcomp.quant._quantize import dequantize, quantize
from jaxcomp.quant._tree import dequantize_tree, quantize_tree

__all__ = [
    "QArray",
    "QuantConfig",
    "dequantize",
    "dequantize_tree",
    "fake_quant",
    "lsq_fake_quant",
    "quantize",
    "quantize_tree",
]
