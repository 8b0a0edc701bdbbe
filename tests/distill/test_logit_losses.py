"""Logit distillation losses against float64 numpy references.

Tolerances: the losses run in float32. Each vocabulary term ``p (log p - log q)`` is
formed from log-softmax values of size O(10) with relative error ~1e-7, so a
per-position sum over V <= 16 terms carries an absolute error of a few 1e-6;
``rtol=1e-5, atol=5e-6`` covers it with margin while catching any convention
error (those change values at the 1e-2 level or more).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from jaxcomp import distill

RTOL, ATOL = 1e-5, 5e-6


# ----------------------------------------------------------------------------- references


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    finite_max = np.max(np.where(np.isfinite(z), z, -np.inf), axis=-1, keepdims=True)
    shifted = z - finite_max
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _np_kl(a, b):
    """sum a log(a / b) with 0 log 0 = 0, float64."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0)
    return terms.sum(-1)


def _np_dists(zs, zt, temperature):
    q = np.exp(_np_log_softmax(np.asarray(zs, np.float64) / temperature))
    p = np.exp(_np_log_softmax(np.asarray(zt, np.float64) / temperature))
    return p, q


def _ref_kl(zs, zt, temperature):
    p, q = _np_dists(zs, zt, temperature)
    return _np_kl(p, q)


def _ref_reverse_kl(zs, zt, temperature):
    p, q = _np_dists(zs, zt, temperature)
    return _np_kl(q, p)


def _ref_jsd(zs, zt, temperature, beta):
    p, q = _np_dists(zs, zt, temperature)
    if beta == 0:
        return _np_kl(p, q)
    if beta == 1:
        return _np_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)


def _ref_skew_kl(zs, zt, temperature, alpha):
    p, q = _np_dists(zs, zt, temperature)
    return _np_kl(p, alpha * p + (1 - alpha) * q)


def _ref_skew_reverse_kl(zs, zt, temperature, alpha):
    p, q = _np_dists(zs, zt, temperature)
    return _np_kl(q, alpha * q + (1 - alpha) * p)


def _ref_tv(zs, zt, temperature):
    p, q = _np_dists(zs, zt, temperature)
    return 0.5 * np.abs(p - q).sum(-1)


def _ref_soft_ce(zs, zt, temperature):
    p, q = _np_dists(zs, zt, temperature)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(q), 0.0).sum(-1)


def _ref_hinton(zs, zt, labels, temperature, alpha, t_squared):
    soft = _ref_kl(zs, zt, temperature) * (temperature**2 if t_squared else 1.0)
    log_probs = _np_log_softmax(zs)
    hard = -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return alpha * soft + (1 - alpha) * hard


# (name, jax function, reference, extra keyword arguments)
CASES = [
    ("kl_div", distill.kl_div, _ref_kl, {}),
    ("reverse_kl", distill.reverse_kl, _ref_reverse_kl, {}),
    ("total_variation", distill.total_variation, _ref_tv, {}),
    ("soft_cross_entropy", distill.soft_cross_entropy, _ref_soft_ce, {}),
    *[
        (f"jsd_beta{b}", distill.generalized_jsd, functools.partial(_ref_jsd, beta=b), {"beta": b})
        for b in (0.0, 0.1, 0.5, 0.9, 1.0)
    ],
    *[
        (f"skew_kl_a{a}", distill.skew_kl, functools.partial(_ref_skew_kl, alpha=a), {"alpha": a})
        for a in (0.0, 0.1, 0.5)
    ],
    *[
        (
            f"skew_rkl_a{a}",
            distill.skew_reverse_kl,
            functools.partial(_ref_skew_reverse_kl, alpha=a),
            {"alpha": a},
        )
        for a in (0.0, 0.1, 0.5)
    ],
]
IDS = [c[0] for c in CASES]
# one case per function, for the slower gradient and multi-device checks
_ONE_EACH = ("kl_div", "reverse_kl", "total_variation", "soft_cross_entropy", "jsd_beta0.5")
ONE_PER_FUNCTION = [c for c in CASES if c[0] in (*_ONE_EACH, "skew_kl_a0.1", "skew_rkl_a0.1")]


def _every_loss(labels=None, **common):
    """Every case of CASES (then hinton_loss, given labels) in one function, results stacked.

    One ``jit`` / ``jacrev`` of it compiles once for all losses, which keeps the tests fast.
    """

    def every(zs, zt):
        out = [fn(zs, zt, **kwargs, **common) for _, fn, _, kwargs in CASES]
        if labels is not None:
            out.append(distill.hinton_loss(zs, zt, labels, **common))
        return jax.tree.map(lambda *xs: jnp.stack(xs), *out)

    return every


def _logits(rng, shape, scale=2.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _masked_mean(per_position, mask):
    return per_position[mask].sum() / max(mask.sum(), 1)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize(("name", "fn", "ref", "kwargs"), CASES, ids=IDS)
def test_matches_float64_reference(rng, name, fn, ref, kwargs, temperature):
    zs, zt = _logits(rng, (3, 5, 11)), _logits(rng, (3, 5, 11))
    mask = rng.random((3, 5)) < 0.7
    expected = ref(zs, zt, temperature)

    per_position = fn(zs, zt, temperature=temperature, reduction="none", **kwargs)
    assert per_position.shape == (3, 5) and per_position.dtype == jnp.float32
    np.testing.assert_allclose(per_position, expected, rtol=RTOL, atol=ATOL)

    mean = fn(zs, zt, temperature=temperature, where=mask, **kwargs)
    assert mean.shape == () and mean.dtype == jnp.float32
    np.testing.assert_allclose(mean, _masked_mean(expected, mask), rtol=RTOL, atol=ATOL)

    total, count = fn(zs, zt, temperature=temperature, where=mask, reduction="sum_count", **kwargs)
    assert count.dtype == jnp.int32 and int(count) == mask.sum()
    np.testing.assert_allclose(total, expected[mask].sum(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("t_squared", [True, False])
@pytest.mark.parametrize(
    ("temperature", "alpha"), [(1.0, 0.5), (4.0, 0.9), (20.0, 1.0), (2.0, 0.0)]
)
def test_hinton_matches_float64_reference(rng, temperature, alpha, t_squared):
    zs, zt = _logits(rng, (4, 6, 9)), _logits(rng, (4, 6, 9))
    labels = rng.integers(0, 9, (4, 6)).astype(np.int32)
    mask = rng.random((4, 6)) < 0.6
    labels_padded = np.where(mask, labels, -100).astype(np.int32)  # ignored positions
    expected = _ref_hinton(zs, zt, labels, temperature, alpha, t_squared)
    got = distill.hinton_loss(
        zs, zt, labels_padded, temperature=temperature, alpha=alpha, t_squared=t_squared, where=mask
    )
    # T^2 = 400 scales the float32 error of the soft term; relative tolerance stays 1e-5.
    np.testing.assert_allclose(got, _masked_mean(expected, mask), rtol=RTOL, atol=ATOL)


def test_identical_logits_give_zero_divergence(rng):
    z = _logits(rng, (4, 7))
    got = np.asarray(_every_loss()(z, z))
    is_ce = np.array([name == "soft_cross_entropy" for name in IDS])
    np.testing.assert_allclose(got[~is_ce], 0.0, atol=1e-6)
    log_p = _np_log_softmax(z)
    entropy = -(np.exp(log_p) * log_p).sum(-1).mean()
    np.testing.assert_allclose(got[is_ce], entropy, rtol=RTOL)


def test_single_distribution_and_bf16_teacher(rng):
    zs, zt = _logits(rng, (13,)), _logits(rng, (13,))
    np.testing.assert_allclose(distill.kl_div(zs, zt), _ref_kl(zs, zt, 1.0), rtol=RTOL)
    total, count = distill.kl_div(zs, zt, reduction="sum_count")
    assert int(count) == 1

    zt_bf16 = jnp.asarray(_logits(rng, (5, 13)), jnp.bfloat16)
    zs = _logits(rng, (5, 13))
    zt_rounded = np.asarray(zt_bf16.astype(jnp.float32))
    got = jax.jit(_every_loss(temperature=2.0))(zs, zt_bf16)
    assert got.dtype == jnp.float32
    expected = [ref(zs, zt_rounded, 2.0).mean() for _, _, ref, _ in CASES]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    # a bf16 student also computes in float32
    got = distill.kl_div(zt_bf16, jnp.asarray(zs), temperature=2.0)
    np.testing.assert_allclose(got, _ref_kl(zt_rounded, zs, 2.0).mean(), rtol=RTOL, atol=ATOL)


def test_generalized_jsd_endpoints_are_forward_and_reverse_kl(rng):
    zs, zt = _logits(rng, (6, 8)), _logits(rng, (6, 8))
    fkl, rkl = distill.kl_div(zs, zt), distill.reverse_kl(zs, zt)
    # same formula as kl_div / reverse_kl; XLA may fuse it differently (a few ulp)
    np.testing.assert_allclose(distill.generalized_jsd(zs, zt, beta=0.0), fkl, rtol=1e-6)
    np.testing.assert_allclose(distill.generalized_jsd(zs, zt, beta=1.0), rkl, rtol=1e-6)
    # the interior tends to 0 at both ends (the endpoints are a convention, not a limit)
    assert float(distill.generalized_jsd(zs, zt, beta=1e-4)) < 1e-2 * float(fkl)
    assert float(distill.generalized_jsd(zs, zt, beta=1 - 1e-4)) < 1e-2 * float(rkl)
    # and traced endpoint values select the same branches
    jsd = jax.jit(lambda b: distill.generalized_jsd(zs, zt, beta=b))
    np.testing.assert_allclose(jsd(jnp.float32(0.0)), fkl, rtol=1e-6)
    np.testing.assert_allclose(jsd(jnp.float32(1.0)), rkl, rtol=1e-6)


# ----------------------------------------------------------------------------- masks, -inf


def test_where_excludes_garbage_positions(rng):
    zs, zt = _logits(rng, (4, 6, 10)), _logits(rng, (4, 6, 10))
    mask = rng.random((4, 6)) < 0.5
    labels = rng.integers(0, 10, (4, 6)).astype(np.int32)
    zs_bad, zt_bad = zs.copy(), zt.copy()
    zs_bad[~mask] = np.nan
    zt_bad[~mask] = -np.inf
    labels_bad = np.where(mask, labels, -100).astype(np.int32)
    every = _every_loss(labels_bad, temperature=2.0, where=mask)
    expected = [ref(zs, zt, 2.0)[mask].mean() for _, _, ref, _ in CASES]
    expected.append(_ref_hinton(zs, zt, labels, 2.0, 0.9, True)[mask].mean())
    np.testing.assert_allclose(jax.jit(every)(zs_bad, zt_bad), expected, rtol=RTOL, atol=ATOL)
    grads = np.asarray(jax.jit(jax.jacrev(every))(zs_bad, zt_bad))
    assert grads.shape == (len(CASES) + 1, 4, 6, 10)
    assert np.isfinite(grads).all()
    assert (grads[:, ~mask] == 0).all() and (grads[:, mask] != 0).any(axis=(1, 2)).all()


def test_fully_masked_batch_gives_zero_not_nan(rng):
    zs, zt = _logits(rng, (3, 7)), _logits(rng, (3, 7))
    zs[:] = np.nan
    none = np.zeros(3, bool)
    labels = np.full(3, -100, np.int32)
    every = _every_loss(labels, where=none)
    assert (np.asarray(jax.jit(every)(zs, zt)) == 0).all()
    total, count = _every_loss(labels, where=none, reduction="sum_count")(zs, zt)
    assert (np.asarray(total) == 0).all() and (np.asarray(count) == 0).all()
    assert (np.asarray(jax.jit(jax.jacrev(every))(zs, zt)) == 0).all()


def test_neg_inf_vocabulary_entries(rng):
    """-inf in both models at the same entries equals the loss on the reduced vocabulary."""
    zs, zt = _logits(rng, (4, 9)), _logits(rng, (4, 9))
    banned = np.zeros((4, 9), bool)
    banned[:, [2, 5]] = True
    banned[1, 7] = True
    labels = np.array([0, 1, 3, 8], np.int32)
    zs_inf, zt_inf = np.where(banned, -np.inf, zs), np.where(banned, -np.inf, zt)
    expected = [ref(zs_inf, zt_inf, 1.5) for _, _, ref, _ in CASES]
    expected.append(_ref_hinton(zs_inf, zt_inf, labels, 1.5, 0.9, True))
    assert np.isfinite(expected).all()
    got = jax.jit(_every_loss(labels, temperature=1.5, reduction="none"))(zs_inf, zt_inf)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    # row 0 on its 7 allowed entries gives the same values as the reduced vocabulary
    keep = ~banned[0]
    reduced = _every_loss(np.array([0], np.int32), temperature=1.5, reduction="none")(
        zs[:1, keep], zt[:1, keep]
    )
    np.testing.assert_allclose(np.asarray(got)[:, :1], reduced, rtol=RTOL, atol=ATOL)
    grads = np.asarray(jax.jit(jax.jacrev(_every_loss(labels, temperature=1.5)))(zs_inf, zt_inf))
    assert np.isfinite(grads).all()
    assert (grads[:, banned] == 0).all()


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    ("name", "fn", "ref", "kwargs"), ONE_PER_FUNCTION, ids=[c[0] for c in ONE_PER_FUNCTION]
)
def test_check_grads(rng, name, fn, ref, kwargs):
    zs, zt = _logits(rng, (2, 5), 1.0), _logits(rng, (2, 5), 1.0)
    check_grads(
        jax.jit(lambda s: fn(s, zt, temperature=1.5, **kwargs)), (zs,), order=1, modes=["rev"]
    )


def test_hinton_check_grads_and_teacher_gets_no_gradient(rng):
    zs, zt = _logits(rng, (2, 5), 1.0), _logits(rng, (2, 5), 1.0)
    labels = np.array([1, 3], np.int32)
    check_grads(
        jax.jit(lambda s: distill.hinton_loss(s, zt, labels, temperature=2.0, alpha=0.7)),
        (zs,),
        order=1,
        modes=["rev"],
    )
    teacher_grads = jax.jit(jax.jacrev(_every_loss(labels), argnums=1))(zs, zt)
    assert teacher_grads.shape == (len(CASES) + 1, 2, 5)
    assert (np.asarray(teacher_grads) == 0).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_kl_gradient_is_q_minus_p_over_t(rng, temperature):
    """d/dz_s of the mean KL over N rows is (q - p) / (T N); Hinton's T^2 makes it T (q - p) / N."""
    zs, zt = _logits(rng, (4, 7)), _logits(rng, (4, 7))
    p, q = _np_dists(zs, zt, temperature)
    grad = jax.jit(jax.grad(lambda s: distill.kl_div(s, zt, temperature=temperature)))(zs)
    np.testing.assert_allclose(grad, (q - p) / (temperature * 4), rtol=1e-4, atol=1e-7)
    labels = np.zeros(4, np.int32)
    grad = jax.jit(
        jax.grad(lambda s: distill.hinton_loss(s, zt, labels, temperature=temperature, alpha=1.0))
    )(zs)
    np.testing.assert_allclose(grad, temperature * (q - p) / 4, rtol=1e-4, atol=1e-7)


def test_t_squared_gradient_tends_to_logit_matching(rng):
    """For zero-mean rows, d/dz_s T^2 KL(p_T || q_T) = T (q - p) -> (z_s - z_t) / V as T -> inf.

    Expanding softmax(a / T)_i = (1 + a_i / T + (a_i^2 - mean(a^2)) / (2 T^2) + O(T^-3)) / V
    for zero-mean a, T (q - p) = (z_s - z_t) / V + c / T + O(T^-2) with
    c = [(z_s^2 - mean z_s^2) - (z_t^2 - mean z_t^2)] / (2 V). With a mean over N rows
    every gradient is divided by N.
    """
    n, v = 3, 6
    zs, zt = _logits(rng, (n, v), 1.0), _logits(rng, (n, v), 1.0)
    zs -= zs.mean(-1, keepdims=True)
    zt -= zt.mean(-1, keepdims=True)
    zs64, zt64 = zs.astype(np.float64), zt.astype(np.float64)
    limit = (zs64 - zt64) / (v * n)
    c = (zs64**2 - (zs64**2).mean(-1, keepdims=True)) - (
        zt64**2 - (zt64**2).mean(-1, keepdims=True)
    )
    c /= 2 * v * n
    labels = np.zeros(n, np.int32)
    soft_grad = jax.jit(
        jax.grad(lambda s, t: distill.hinton_loss(s, zt, labels, temperature=t, alpha=1.0))
    )
    errors = []
    for temperature in (10.0, 100.0, 1000.0):
        grad = soft_grad(zs, jnp.float32(temperature))
        error = np.asarray(grad, np.float64) - limit
        errors.append(np.abs(error).max())
        # first-order correction predicts the error up to O(T^-2) and float32 rounding (T eps / V)
        np.testing.assert_allclose(error, c / temperature, atol=2.0 / temperature**2 + 1e-5)
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5
    assert errors[2] < 1e-3 * np.abs(limit).max()


# ----------------------------------------------------------------------------- reductions


@pytest.mark.parametrize(
    ("name", "fn", "ref", "kwargs"),
    [c for c in CASES if c[0] in ("kl_div", "jsd_beta0.5")],
    ids=["kl_div", "jsd_beta0.5"],
)
def test_micro_batches_add_up_through_sum_count(rng, name, fn, ref, kwargs):
    zs, zt = _logits(rng, (8, 5, 7)), _logits(rng, (8, 5, 7))
    mask = rng.random((8, 5)) < np.linspace(0.1, 0.9, 8)[:, None]  # uneven counts per chunk
    full = fn(zs, zt, where=mask, **kwargs)
    total, count = jnp.float32(0.0), jnp.int32(0)
    means = []
    for chunk in np.split(np.arange(8), 4):
        s, c = fn(zs[chunk], zt[chunk], where=mask[chunk], reduction="sum_count", **kwargs)
        total, count = total + s, count + c
        means.append(fn(zs[chunk], zt[chunk], where=mask[chunk], **kwargs))
    np.testing.assert_allclose(distill.mean_from_sum_count(total, count), full, rtol=RTOL)
    assert int(count) == mask.sum()
    # averaging the chunk means would be wrong with uneven masks
    assert abs(float(np.mean(means)) - float(full)) > 1e-3


def test_mean_from_sum_count():
    assert float(distill.mean_from_sum_count(jnp.float32(6.0), jnp.int32(4))) == 1.5
    assert float(distill.mean_from_sum_count(jnp.float32(0.0), jnp.int32(0))) == 0.0
    assert float(distill.mean_from_sum_count(jnp.float32(3.0), jnp.float32(2.0))) == 1.5


def test_integer_where_mask(rng):
    zs, zt = _logits(rng, (2, 3, 5)), _logits(rng, (2, 3, 5))
    mask = (rng.random((2, 3)) < 0.5).astype(np.int32)
    np.testing.assert_allclose(
        distill.kl_div(zs, zt, where=mask), distill.kl_div(zs, zt, where=mask.astype(bool))
    )


# ----------------------------------------------------------------------------- jit, traced


def test_jit_with_traced_hyperparameters_compiles_once(rng):
    zs, zt = _logits(rng, (4, 9)), _logits(rng, (4, 9))
    labels = rng.integers(0, 9, 4).astype(np.int32)
    mask = np.array([True, False, True, True])
    traces = []

    @jax.jit
    def all_losses(zs, zt, mask, temperature, beta, alpha):
        traces.append(1)
        return jnp.stack(
            [
                distill.kl_div(zs, zt, temperature=temperature, where=mask),
                distill.reverse_kl(zs, zt, temperature=temperature, where=mask),
                distill.generalized_jsd(zs, zt, beta=beta, temperature=temperature, where=mask),
                distill.skew_kl(zs, zt, alpha=alpha, temperature=temperature, where=mask),
                distill.skew_reverse_kl(zs, zt, alpha=alpha, temperature=temperature, where=mask),
                distill.total_variation(zs, zt, temperature=temperature, where=mask),
                distill.soft_cross_entropy(zs, zt, temperature=temperature, where=mask),
                distill.hinton_loss(
                    zs, zt, labels, temperature=temperature, alpha=alpha, where=mask
                ),
            ]
        )

    for temperature, beta, alpha in [(1.0, 0.5, 0.1), (3.0, 0.2, 0.6), (0.7, 0.0, 1.0)]:
        got = all_losses(
            zs, zt, mask, jnp.float32(temperature), jnp.float32(beta), jnp.float32(alpha)
        )
        refs = [
            _ref_kl(zs, zt, temperature),
            _ref_reverse_kl(zs, zt, temperature),
            _ref_jsd(zs, zt, temperature, beta),
            _ref_skew_kl(zs, zt, temperature, alpha),
            _ref_skew_reverse_kl(zs, zt, temperature, alpha),
            _ref_tv(zs, zt, temperature),
            _ref_soft_ce(zs, zt, temperature),
            _ref_hinton(zs, zt, labels, temperature, alpha, True),
        ]
        expected = [r[mask].mean() for r in refs]
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert len(traces) == 1


def test_traced_out_of_range_hyperparameters_give_nan(rng):
    """Traced values cannot raise; they must not give a plausible number either."""
    zs, zt = _logits(rng, (3, 6)), _logits(rng, (3, 6))
    labels = np.array([0, 2, 5], np.int32)

    @jax.jit
    def losses(temperature, beta, alpha):
        return jnp.stack(
            [
                distill.kl_div(zs, zt, temperature=temperature),
                distill.generalized_jsd(zs, zt, beta=beta),
                distill.skew_kl(zs, zt, alpha=alpha),
                distill.skew_reverse_kl(zs, zt, alpha=alpha),
                distill.hinton_loss(zs, zt, labels, alpha=alpha),
                distill.hinton_loss(zs, zt, labels, temperature=temperature),
            ]
        )

    assert np.isfinite(losses(jnp.float32(2.0), jnp.float32(0.5), jnp.float32(0.5))).all()
    for temperature, beta, alpha in [(-1.0, 1.5, -0.1), (0.0, -0.5, 1.1), (np.nan,) * 3]:
        got = losses(jnp.float32(temperature), jnp.float32(beta), jnp.float32(alpha))
        assert np.isnan(got).all(), (temperature, beta, alpha, got)


def test_optax_schedule_drives_temperature_inside_jit(rng):
    import optax

    zs, zt = _logits(rng, (3, 5)), _logits(rng, (3, 5))
    schedule = optax.linear_schedule(8.0, 1.0, transition_steps=10)
    loss = jax.jit(lambda step: distill.kl_div(zs, zt, temperature=schedule(step)))
    for step in (0, 5, 10):
        expected = _ref_kl(zs, zt, float(schedule(step))).mean()
        np.testing.assert_allclose(loss(jnp.int32(step)), expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- devices


def _all_sum_count(zs, zt, mask, labels):
    pairs = [
        fn(zs, zt, where=mask, reduction="sum_count", **kw) for _, fn, _, kw in ONE_PER_FUNCTION
    ]
    pairs.append(distill.hinton_loss(zs, zt, labels, where=mask, reduction="sum_count"))
    return jnp.stack([s for s, _ in pairs]), jnp.stack([c for _, c in pairs])


def _device_inputs(rng):
    zs, zt = _logits(rng, (16, 3, 7)), _logits(rng, (16, 3, 7))
    mask = rng.random((16, 3)) < 0.6
    labels = rng.integers(0, 7, (16, 3)).astype(np.int32)
    sums, counts = _all_sum_count(zs, zt, mask, labels)
    return (zs, zt, mask, labels), np.asarray(distill.mean_from_sum_count(sums, counts))


def test_mesh_psum_of_sum_count_equals_single_device(rng):
    args, expected = _device_inputs(rng)
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))

    def local(zs, zt, mask, labels):
        sums, counts = _all_sum_count(zs, zt, mask, labels)
        return jax.lax.psum(sums, "data"), jax.lax.psum(counts, "data")

    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=(P(), P())))
    sums, counts = sharded(*args)
    np.testing.assert_allclose(distill.mean_from_sum_count(sums, counts), expected, rtol=RTOL)

    # global-view jit on inputs sharded over the mesh gives the same means
    placed = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args]
    sums, counts = jax.jit(_all_sum_count)(*placed)
    np.testing.assert_allclose(distill.mean_from_sum_count(sums, counts), expected, rtol=RTOL)


def test_pmap_psum_of_sum_count_equals_single_device(rng):
    args, expected = _device_inputs(rng)
    per_device = [a.reshape(8, 2, *a.shape[1:]) for a in args]

    def local(zs, zt, mask, labels):
        sums, counts = _all_sum_count(zs, zt, mask, labels)
        return jax.lax.psum(sums, "i"), jax.lax.psum(counts, "i")

    sums, counts = jax.pmap(local, axis_name="i")(*per_device)
    np.testing.assert_allclose(distill.mean_from_sum_count(sums[0], counts[0]), expected, rtol=RTOL)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(rng):
    zs, zt = _logits(rng, (2, 5)), _logits(rng, (2, 5))
    with pytest.raises(ValueError, match=r"student_logits has 5 .* teacher_logits has 6"):
        distill.kl_div(zs, _logits(rng, (2, 6)))
    with pytest.raises(ValueError, match=r"\(3, 5\).*leading"):
        distill.reverse_kl(zs, _logits(rng, (3, 5)))
    with pytest.raises(ValueError, match="leading"):
        distill.total_variation(_logits(rng, (2, 1, 5)), _logits(rng, (2, 3, 5)))
    for bad in (0.0, -1.0, np.float32(0.0), float("nan"), float("inf"), jnp.float32(-2.0)):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            distill.kl_div(zs, zt, temperature=bad)
    for bad in (-0.1, 1.5, np.float64(2.0)):
        with pytest.raises(ValueError, match=f"beta must be in \\[0, 1\\]; got {bad}"):
            distill.generalized_jsd(zs, zt, beta=bad)
        with pytest.raises(ValueError, match="alpha must be in"):
            distill.skew_kl(zs, zt, alpha=bad)
        with pytest.raises(ValueError, match="alpha must be in"):
            distill.skew_reverse_kl(zs, zt, alpha=bad)
        with pytest.raises(ValueError, match="alpha must be in"):
            distill.hinton_loss(zs, zt, np.zeros(2, np.int32), alpha=bad)
    with pytest.raises(ValueError, match="temperature must be a scalar"):
        distill.kl_div(zs, zt, temperature=np.ones(2, np.float32))
    for bad in ("hot", True, 1j):
        with pytest.raises(TypeError, match="temperature must be a real number"):
            distill.kl_div(zs, zt, temperature=bad)
    # any real dtype is accepted for a valid value
    for ok in (2, np.int64(2), jnp.bfloat16(2.0), jnp.float32(2.0)):
        np.testing.assert_allclose(
            distill.kl_div(zs, zt, temperature=ok), _ref_kl(zs, zt, 2.0).mean(), rtol=RTOL
        )
    with pytest.raises(ValueError, match="reduction must be one of"):
        distill.kl_div(zs, zt, reduction="batchmean")
    with pytest.raises(ValueError, match=r"where has shape \(5,\)"):
        distill.kl_div(zs, zt, where=np.ones(5, bool))
    with pytest.raises(TypeError, match="where must be a boolean"):
        distill.kl_div(zs, zt, where=np.ones(2, np.float32))
    with pytest.raises(TypeError, match="floating dtype"):
        distill.kl_div(zs.astype(np.int32), zt)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        distill.hinton_loss(zs, zt, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"labels has shape \(3,\)"):
        distill.hinton_loss(zs, zt, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\).*got 7"):
        distill.hinton_loss(zs, zt, np.array([0, 7], np.int32))
    with pytest.raises(TypeError, match="t_squared must be a Python bool"):
        distill.hinton_loss(zs, zt, np.zeros(2, np.int32), t_squared=1)
    # checks run at trace time too, on concrete values
    with pytest.raises(ValueError, match="student_logits has 5"):
        jax.jit(lambda s, t: distill.kl_div(s, t))(zs, _logits(rng, (2, 6)))
    with pytest.raises(ValueError, match="temperature must be finite"):
        jax.jit(lambda s: distill.kl_div(s, zt, temperature=-1.0))(zs)
