"""A QAT train step (int4 STE and LSQ weights, STE + int8 activations) against the float step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from benchmarks._harness import interleaved, row
from jaxcomp import models, quant

CONFIG = quant.QuantConfig(bits=4)
NAMES = {"ste": "ste int4", "lsq": "lsq int4", "ste_act8": "ste int4 + int8 activations"}


def _steps(model, tx, x, y):
    def loss(params, scales, fake):
        if fake == "ste":
            params = quant.fake_quantize_tree(params, default=CONFIG)
        elif fake == "lsq":
            params = quant.fake_quantize_tree(params, default=CONFIG, scales=scales)
        if fake == "ste_act8":  # int4 STE weights and per-token int8 activations
            with quant.fake_quant_activations(bits=8):
                logits = model.apply(
                    {"params": quant.fake_quantize_tree(params, default=CONFIG)}, x
                )
        else:
            logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def make(fake):
        @jax.jit
        def step(train, state):
            grads = jax.grad(lambda t: loss(t["params"], t["scales"], fake))(train)
            updates, state = tx.update(grads, state, train)
            return optax.apply_updates(train, updates), state

        return step

    return {fake: make(fake) for fake in ("float", "ste", "lsq", "ste_act8")}


def run(*, quick: bool = False) -> list[dict]:
    batch, repeats = (64, 5) if quick else (256, 15)
    model = models.MLP()  # Hinton's 2x800 student
    x = jax.random.normal(jax.random.key(0), (batch, 784), jnp.float32)
    y = jnp.zeros(batch, jnp.int32)
    params = model.init(jax.random.key(1), x)["params"]
    scales = quant.init_lsq_scales(params, default=CONFIG)
    tx = optax.adam(1e-3)
    steps = _steps(model, tx, x, y)
    float_train = {"params": params, "scales": None}
    lsq_train = {"params": params, "scales": scales}
    float_state, lsq_state = tx.init(float_train), tx.init(lsq_train)
    rows = []
    cases = (
        ("ste", float_train, float_state),
        ("lsq", lsq_train, lsq_state),
        ("ste_act8", float_train, float_state),
    )
    for fake, train, state in cases:
        t_ours, t_base = interleaved(
            lambda f=fake, t=train, s=state: steps[f](t, s),
            lambda: steps["float"](float_train, float_state),
            repeats=repeats,
        )
        rows.append(
            row(
                "qat",
                f"{NAMES[fake]} step, MLP 2x800, batch {batch}",
                t_ours,
                t_base,
                target="<= 1.3",
                passed=t_ours / t_base <= 1.3,
            )
        )
    return rows
