"""Small reference classifiers in Flax: Hinton's MLPs and a small CNN.

References: Hinton et al., Distilling the Knowledge in a Neural Network, 2015
(teacher 2x1200 ReLU with dropout, student 2x800).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

#: Hidden sizes used throughout the examples: Hinton's teacher and student, and a smaller one.
HINTON_SIZES = {"teacher": (1200, 1200), "student": (800, 800), "small": (300, 300)}


class MLP(nn.Module):
    """ReLU multi-layer perceptron over flattened inputs.

    Attributes:
      features: hidden layer widths.
      num_classes: number of output logits.
      dropout_rate: dropout after every hidden layer (training only).
    """

    features: Sequence[int] = HINTON_SIZES["student"]
    num_classes: int = 10
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for width in self.features:
            x = nn.relu(nn.Dense(width)(x))
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Two 3x3 conv layers with max-pooling, then a Dense head.

    Attributes:
      channels: output channels of the two conv layers.
      hidden: width of the Dense layer before the logits.
      num_classes: number of output logits.
    """

    channels: Sequence[int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class NNXMLP(nnx.Module):
    """The same MLP written with Flax NNX (``nnx.Linear`` layers)."""

    def __init__(
        self,
        in_features: int,
        features: Sequence[int] = HINTON_SIZES["student"],
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
    ):
        widths = [in_features, *features]
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for layer in self.hidden:
            x = nnx.relu(layer(x))
        return self.head(x)


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuilds a Linen classifier from the plain-dict ``config`` stored with checkpoints.

    ``config`` is ``{"kind": "mlp", "features": [...], "num_classes": 10,
    "dropout_rate": 0.0}`` or ``{"kind": "cnn", ...}``.
    """
    kind = config.get("kind")
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    if "features" in kwargs:
        kwargs["features"] = tuple(kwargs["features"])
    if "channels" in kwargs:
        kwargs["channels"] = tuple(kwargs["channels"])
    if kind == "mlp":
        return MLP(**kwargs)
    if kind == "cnn":
        return CNN(**kwargs)
    raise ValueError(f"model kind {kind!r} is unknown; expected 'mlp' or 'cnn'")


def init_params(model: nn.Module, input_shape: Sequence[int], seed: int = 0) -> dict:
    """Initialises ``model`` for inputs of shape ``[1, *input_shape]`` and returns its params."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    return model.init(jax.random.key(seed), x)["params"]
