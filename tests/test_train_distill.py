"""Distillation steps: numpy reference, and jit / 8-device mesh (replicated, FSDP) / pmap agree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcomp import quant, sparsity, train
from jaxcomp.distill import kl_div

T = 2.0


def _student(p, b, k):
    del k
    return b["x"] @ p["w"] + p["b"]


def _teacher(tp, b):
    return jnp.tanh(b["x"].astype(tp["w1"].dtype) @ tp["w1"]) @ tp["w2"]


def _terms(masked=False):
    def kl(s, t, b):
        if masked:
            return kl_div(s, t, temperature=T, where=b["m"], reduction="sum_count")
        return kl_div(s, t, temperature=T)

    def ce(s, t, b):
        del t
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s, b["y"]))

    return [("kl", 1.0, kl), ("ce", 0.5, ce)]


@pytest.fixture
def problem(rng):
    x = rng.normal(size=(64, 16)).astype(np.float32)
    y = rng.integers(0, 10, size=64).astype(np.int32)
    m = rng.random(64) > 0.5
    m[:24] = False  # uneven counts of kept examples per device
    params = {"w": np.zeros((16, 10), np.float32), "b": np.zeros((10,), np.float32)}
    teacher = {
        "w1": rng.normal(size=(16, 32)).astype(np.float32),
        "w2": rng.normal(size=(32, 10)).astype(np.float32),
    }
    batches = list(train.batch_iterator({"x": x, "y": y, "m": m}, 32, seed=0, epoch=0))
    batches = batches + list(train.batch_iterator({"x": x, "y": y, "m": m}, 32, seed=0, epoch=1))
    return params, teacher, batches


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_first_step_matches_numpy_gradient(problem):
    params, teacher, batches = problem
    tx = optax.sgd(0.3)
    step = train.make_distill_step(_student, tx, terms=_terms(), teacher_apply=_teacher)
    b = batches[0]
    p, _, metrics = step(
        jax.tree.map(jnp.asarray, params), tx.init(params), b, jax.random.key(0), teacher
    )
    x, y = b["x"].astype(np.float64), b["y"]
    zt = np.tanh(x @ teacher["w1"]) @ teacher["w2"]
    pt, q, s = _np_softmax(zt / T), _np_softmax(np.zeros((32, 10))), _np_softmax(np.zeros((32, 10)))
    kl = np.mean(np.sum(pt * (np.log(pt) - np.log(q)), -1))
    onehot = np.eye(10)[y]
    dz = (q - pt) / T / 32 + 0.5 * (s - onehot) / 32  # d loss / d logits
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], kl + 0.5 * np.log(10), rtol=1e-5)
    np.testing.assert_allclose(p["w"], -0.3 * x.T @ dz, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(p["b"], -0.3 * dz.sum(0), rtol=1e-4, atol=1e-6)


def _trajectory(step, params, opt_state, batches, teacher, prepare=lambda b: b, key=None):
    key = jax.random.key(0) if key is None else key
    losses = []
    for b in batches:
        params, opt_state, m = step(params, opt_state, prepare(b), key, teacher)
        losses.append(float(np.asarray(m["loss"]).reshape(-1)[0]))
    return params, np.array(losses)


@pytest.mark.parametrize("masked", [False, True])
def test_jit_mesh_fsdp_pmap_same_trajectory(problem, masked, standard_promotion):
    params, teacher, batches = problem
    tx = optax.adam(3e-2)
    kw = dict(terms=_terms(masked), teacher_apply=_teacher)
    single_p, single = _trajectory(
        train.make_distill_step(_student, tx, **kw),
        jax.tree.map(jnp.asarray, params),
        tx.init(params),
        batches,
        teacher,
    )
    assert single[-1] < single[0]
    mesh = train.data_mesh()
    for mode in ("replicated", "fsdp"):
        p0 = train.shard_params(params, mesh, mode)
        step = train.make_distill_step(_student, tx, mesh=mesh, param_sharding=mode, **kw)
        p, losses = _trajectory(
            step,
            p0,
            train.shard_params(tx.init(params), mesh, mode),
            batches,
            train.replicate(teacher, mesh),
            prepare=lambda b: train.shard_batch(b, mesh),
        )
        np.testing.assert_allclose(losses, single, rtol=1e-5)
        np.testing.assert_allclose(p["w"], single_p["w"], rtol=1e-4, atol=1e-6)
        want = ("data",) if mode == "fsdp" else ()
        assert tuple(p["w"].sharding.spec) == want
    n = jax.local_device_count()
    step = train.make_distill_step(_student, tx, axis_name="batch", **kw)
    _, losses = _trajectory(
        step,
        train.stack_for_pmap(params),
        train.stack_for_pmap(tx.init(params)),
        batches,
        teacher,
        prepare=lambda b: jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), b),
        key=jax.random.split(jax.random.key(0), n),
    )
    np.testing.assert_allclose(losses, single, rtol=1e-5)


def test_cached_teacher_and_bf16_teacher(problem):
    params, teacher, batches = problem
    tx = optax.sgd(0.1)
    live = train.make_distill_step(_student, tx, terms=_terms(), teacher_apply=_teacher)
    cached = train.make_distill_step(_student, tx, terms=_terms())
    bf16 = train.make_distill_step(
        _student, tx, terms=_terms(), teacher_apply=_teacher, teacher_dtype=jnp.bfloat16
    )
    p = jax.tree.map(jnp.asarray, params)
    _, a = _trajectory(live, p, tx.init(params), batches, teacher)
    p = jax.tree.map(jnp.asarray, params)
    with_cache = [{**b, "teacher": _teacher(teacher, b)} for b in batches]
    _, b = _trajectory(cached, p, tx.init(params), with_cache, None)
    np.testing.assert_allclose(b, a, rtol=1e-6)
    p = jax.tree.map(jnp.asarray, params)
    _, c = _trajectory(bf16, p, tx.init(params), batches, teacher)
    assert not np.array_equal(c, a)  # the teacher really ran in bf16
    np.testing.assert_allclose(c, a, rtol=2e-2)  # bf16 has 8 mantissa bits
    assert live._cache_size() == 1


def test_composes_with_masks_and_fake_quant(problem, standard_promotion):
    params, teacher, batches = problem
    params = {
        "w": np.asarray(np.random.default_rng(1).normal(size=(16, 10)), np.float32),
        "b": params["b"],
    }
    masks = sparsity.compute_masks(params, sparsity=0.5)
    tx = optax.chain(optax.adam(1e-2), sparsity.keep_masks(masks))

    def student(p, b, k):
        return _student({**p, "w": quant.fake_quant(p["w"], bits=4)}, b, k)

    mesh = train.data_mesh()
    step = train.make_distill_step(
        student, tx, terms=_terms(), teacher_apply=_teacher, mesh=mesh, param_sharding="fsdp"
    )
    p0 = sparsity.apply_masks(jax.tree.map(jnp.asarray, params), masks)
    p, losses = _trajectory(
        step,
        train.shard_params(p0, mesh),
        train.shard_params(tx.init(p0), mesh),
        batches,
        train.replicate(teacher, mesh),
        prepare=lambda b: train.shard_batch(b, mesh),
    )
    w = np.asarray(p["w"])
    assert np.all(w[~np.asarray(masks["w"])] == 0)
    assert not np.allclose(w, np.asarray(p0["w"]))
    assert losses[-1] < losses[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="terms is empty"):
        train.make_distill_step(_student, optax.sgd(1.0), terms=[])
    with pytest.raises(ValueError, match="term 'kl' has weight -1"):
        train.make_distill_step(_student, optax.sgd(1.0), terms=[("kl", -1, kl_div)])
    with pytest.raises(ValueError, match="param_sharding must be one of"):
        train.make_distill_step(_student, optax.sgd(1.0), terms=_terms(), param_sharding="zero")
    step = train.make_distill_step(_student, optax.sgd(1.0), terms=_terms())
    p = {"w": jnp.zeros((16, 10)), "b": jnp.zeros(10)}
    batch = {"x": np.zeros((8, 16), np.float32), "y": np.zeros(8, np.int32)}
    with pytest.raises(ValueError, match="cached teacher outputs under 'teacher'"):
        step(p, optax.sgd(1.0).init(p), batch, jax.random.key(0), None)
