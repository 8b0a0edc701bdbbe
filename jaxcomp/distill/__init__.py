"""Knowledge distillation losses.

Logit losses take student logits first and teacher logits second (``[..., V]``),
compute in float32, stop the teacher's gradient, accept a ``where`` mask over the
leading positions and reduce to a masked mean, a ``(sum, count)`` pair for
micro-batches and devices, or per-position values. Feature losses follow the same
conventions for hidden states and channels-last feature maps.
"""

from jaxcomp.distill._cache import TeacherCache, write_teacher_cache
from jaxcomp.distill._capture import capture_linen, capture_nnx, select_layers
from jaxcomp.distill._chunked import chunked_kl
from jaxcomp.distill._divergences import kl_div, reverse_kl, soft_cross_entropy, total_variation
from jaxcomp.distill._dkd import dkd_loss
from jaxcomp.distill._features import attention_transfer, cosine_embedding_loss, hint_mse
from jaxcomp.distill._hinton import hinton_loss
from jaxcomp.distill._jsd import generalized_jsd, skew_kl, skew_reverse_kl
from jaxcomp.distill._reduce import mean_from_sum_count
from jaxcomp.distill._topk import teacher_topk, topk_kl
from jaxcomp.distill._transformer_losses import (
    layer_map,
    minilm_attention_loss,
    minilm_value_loss,
    tinybert_attention_loss,
    tinybert_hidden_loss,
)

__all__ = [
    "TeacherCache",
    "write_teacher_cache",
    "tinybert_hidden_loss",
    "tinybert_attention_loss",
    "select_layers",
    "minilm_value_loss",
    "minilm_attention_loss",
    "layer_map",
    "capture_nnx",
    "capture_linen",
    "attention_transfer",
    "chunked_kl",
    "cosine_embedding_loss",
    "dkd_loss",
    "generalized_jsd",
    "hint_mse",
    "hinton_loss",
    "kl_div",
    "mean_from_sum_count",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "teacher_topk",
    "topk_kl",
    "total_variation",
]
