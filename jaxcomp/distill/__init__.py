"""Knowledge distillation losses.

Logit losses take student logits first and teacher logits second (``[..., V]``),
compute in float32, stop the teacher's gradient, accept a ``where`` mask over the
leading positions and reduce to a masked mean, a ``(sum, count)`` pair for
micro-batches and devices, or per-position values. Feature losses follow the same
conventions for hidden states and channels-last feature maps.
"""

from jaxcomp.distill._divergences import kl_div, reverse_kl, soft_cross_entropy, total_variation
from jaxcomp.distill._dkd import dkd_loss
from jaxcomp.distill._features import attention_transfer, cosine_embedding_loss, hint_mse
from jaxcomp.distill._hinton import hinton_loss
from jaxcomp.distill._jsd import generalized_jsd, skew_kl, skew_reverse_kl
from jaxcomp.distill._reduce import mean_from_sum_count
from jaxcomp.distill._topk import teacher_topk, topk_kl

__all__ = [
    "attention_transfer",
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
