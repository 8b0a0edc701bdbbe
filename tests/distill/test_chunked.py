"""Chunked KL over tokens: same values and gradients as the full-logit losses, less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.distill import chunked_kl, generalized_jsd, kl_div, reverse_kl


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(hs, ws, ht, wt, t, mask, kind):
    """float64 reference: masked mean of per-token divergences from full logits."""
    lq = _np_log_softmax((hs.astype(np.float64) @ ws) / t)
    lp = _np_log_softmax((ht.astype(np.float64) @ wt) / t)
    if kind == "forward":
        v = (np.exp(lp) * (lp - lq)).sum(-1)
    else:
        v = (np.exp(lq) * (lq - lp)).sum(-1)
    return (v * mask).sum() / mask.sum()


@pytest.fixture
def inputs(rng):
    hs = rng.normal(size=(2, 5, 4)).astype(np.float32)
    ht = rng.normal(size=(2, 5, 6)).astype(np.float32)
    ws = rng.normal(size=(4, 11)).astype(np.float32)
    wt = rng.normal(size=(6, 11)).astype(np.float32)
    mask = rng.random((2, 5)) > 0.3
    return hs, ws, ht, wt, mask


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_matches_numpy_reference(inputs, kind, chunk_size):
    hs, ws, ht, wt, mask = inputs
    got = jax.jit(
        lambda *a: chunked_kl(
            *a, divergence=kind, temperature=2.0, where=mask, chunk_size=chunk_size
        )
    )(hs, ws, ht, wt)
    # float32 logits of size ~5 and a log-softmax: relative rounding ~1e-6
    np.testing.assert_allclose(got, _np_kl(hs, ws, ht, wt, 2.0, mask, kind), rtol=2e-5)


@pytest.mark.parametrize(
    "kind,full",
    [
        ("forward", kl_div),
        ("reverse", reverse_kl),
        ("jsd", lambda s, t, **kw: generalized_jsd(s, t, beta=0.3, **kw)),
    ],
)
def test_gradients_match_full_logit_loss(inputs, kind, full):
    hs, ws, ht, wt, mask = inputs

    def chunked(hs, ws, ht, wt):
        return chunked_kl(
            hs, ws, ht, wt, divergence=kind, beta=0.3, temperature=1.5, where=mask, chunk_size=3
        )

    def naive(hs, ws, ht, wt):
        return full(hs @ ws, ht @ wt, temperature=1.5, where=mask)

    v1, g1 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3)))(hs, ws, ht, wt)
    v2, g2 = jax.value_and_grad(naive, argnums=(0, 1, 2, 3))(hs, ws, ht, wt)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.any(g1[2]) and not np.any(g1[3])  # teacher gradients stopped
    assert not np.any(g1[0][~mask])  # masked tokens get no gradient


def test_bias_sum_count_and_none(inputs):
    hs, ws, ht, wt, mask = inputs
    bs, bt = np.linspace(-1, 1, 11, dtype=np.float32), np.linspace(1, -1, 11, dtype=np.float32)
    per = chunked_kl(
        hs,
        ws,
        ht,
        wt,
        student_bias=bs,
        teacher_bias=bt,
        where=mask,
        reduction="none",
        chunk_size=4,
    )
    ref = kl_div(hs @ ws + bs, ht @ wt + bt, where=mask, reduction="none")
    np.testing.assert_allclose(per, ref, rtol=1e-5, atol=1e-7)
    total, count = chunked_kl(hs, ws, ht, wt, where=mask, reduction="sum_count", chunk_size=4)
    assert int(count) == int(mask.sum())
    np.testing.assert_allclose(
        total, float(kl_div(hs @ ws, ht @ wt, where=mask)) * mask.sum(), rtol=1e-5
    )


def test_bf16_teacher_and_garbage_in_masked_tokens(inputs):
    hs, ws, ht, wt, mask = inputs
    ht_bad = ht.copy()
    ht_bad[~mask] = np.nan
    got = chunked_kl(hs, ws, jnp.asarray(ht_bad, jnp.bfloat16), wt, where=mask, chunk_size=3)
    ref = kl_div(hs @ ws, jnp.asarray(ht, jnp.bfloat16).astype(jnp.float32) @ wt, where=mask)
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_peak_memory_below_naive():
    n, d, v = 1024, 64, 4096
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(n, d), (d, v), (n, d), (d, v)]]

    def grad_of(loss):
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    chunked = grad_of(lambda *a: chunked_kl(*a, chunk_size=128))
    naive = grad_of(lambda hs, ws, ht, wt: kl_div(hs @ ws, ht @ wt))
    mem_c = chunked.lower(*args).compile().memory_analysis().temp_size_in_bytes
    mem_n = naive.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert mem_c < 0.25 * mem_n, (mem_c, mem_n)


def test_no_recompile_and_bad_input(inputs):
    hs, ws, ht, wt, mask = inputs
    f = jax.jit(lambda *a: chunked_kl(*a, chunk_size=4))
    f(hs, ws, ht, wt)
    f(hs + 1, ws, ht, wt)
    assert f._cache_size() == 1
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        chunked_kl(hs, ws, ht, wt[:, :5])
    with pytest.raises(ValueError, match=r"student_unembed has shape \(5, 11\)"):
        chunked_kl(hs, np.zeros((5, 11), np.float32), ht, wt)
    with pytest.raises(ValueError, match="divergence must be one of"):
        chunked_kl(hs, ws, ht, wt, divergence="js")
    with pytest.raises(ValueError, match="beta must be strictly inside"):
        chunked_kl(hs, ws, ht, wt, divergence="jsd", beta=1.0)
