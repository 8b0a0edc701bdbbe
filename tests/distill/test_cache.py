"""The offline teacher cache round-trips top-k log-probs and drives a cached distillation step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcomp import train
from jaxcomp.distill import TeacherCache, topk_kl, write_teacher_cache


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_round_trip_matches_numpy_topk(tmp_path, rng):
    logits = rng.normal(size=(10, 3, 20)).astype(np.float32)  # [N, T, V]
    batches = [logits[i : i + 4] for i in range(0, 10, 4)]  # last batch short
    write_teacher_cache(
        tmp_path, jax.jit(lambda b: b), batches, num_examples=10, k=5, temperature=2.0
    )
    cache = TeacherCache(tmp_path)
    assert len(cache) == 10 and cache.k == 5 and cache.temperature == 2.0
    ref = _np_log_softmax(logits.astype(np.float64) / 2.0)
    order = np.argsort(-ref, axis=-1)[..., :5]
    got = cache[np.arange(10)]
    np.testing.assert_array_equal(got["indices"], order)
    np.testing.assert_allclose(got["log_probs"], np.take_along_axis(ref, order, -1), rtol=1e-5)
    assert got["indices"].dtype == np.int32 and got["log_probs"].dtype == np.float32
    assert not list(tmp_path.glob("*.pkl"))


def test_cached_step_equals_live_teacher(tmp_path, rng):
    x = rng.normal(size=(32, 6)).astype(np.float32)
    wt = rng.normal(size=(6, 12)).astype(np.float32)
    write_teacher_cache(tmp_path, lambda b: b @ wt, [x[:16], x[16:]], num_examples=32, k=12)
    cache = TeacherCache(tmp_path)
    terms = [("kl", 1.0, lambda s, t, b: topk_kl(s, t["log_probs"], t["indices"], mode="tail"))]
    live_terms = [
        (
            "kl",
            1.0,
            lambda s, t, b: topk_kl(s, *jax.lax.top_k(jax.nn.log_softmax(t), 12), mode="tail"),
        )
    ]
    tx = optax.sgd(0.5)

    def student(p, b, k):
        return b["x"] @ p

    cached = train.make_distill_step(student, tx, terms=terms)
    live = train.make_distill_step(
        student, tx, terms=live_terms, teacher_apply=lambda w, b: b["x"] @ w
    )
    p1, p2 = jnp.zeros((6, 12)), jnp.zeros((6, 12))
    s1, s2 = tx.init(p1), tx.init(p2)
    for epoch in range(2):
        for idx in np.split(np.random.default_rng(epoch).permutation(32), 4):
            b = {"x": x[idx]}
            p1, s1, m1 = cached(p1, s1, {**b, "teacher": cache[idx]}, jax.random.key(0), None)
            p2, s2, m2 = live(p2, s2, b, jax.random.key(0), wt)
            np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no teacher cache"):
        TeacherCache(tmp_path)
    with pytest.raises(ValueError, match="the batches held 4 examples; num_examples is 5"):
        write_teacher_cache(
            tmp_path, lambda b: b, [np.zeros((4, 3), np.float32)], num_examples=5, k=2
        )
