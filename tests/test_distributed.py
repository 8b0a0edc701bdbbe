"""Data-parallel distillation across 2 processes (jax.distributed, CPU collectives) on localhost.

The test starts this file twice as a worker (``--worker ID PORT``), each process with
4 host CPU devices, forming one 8-device mesh over ``jax.devices()``. Both report
the loss trajectory and the final weights, which must equal a single-process run
on 1 device and on an 8-device mesh.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcomp import train
from jaxcomp.distill import kl_div

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * 32, 16)).astype(np.float32)
    y = rng.integers(0, 10, size=len(x)).astype(np.int32)
    params = {"w": np.zeros((16, 10), np.float32), "b": np.zeros((10,), np.float32)}
    teacher = {"w": rng.normal(size=(16, 10)).astype(np.float32)}
    batches = list(train.batch_iterator({"x": x, "y": y}, 32, seed=0, epoch=0))
    return params, teacher, batches


def _step():
    def ce(s, t, b):
        del t
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s, b["y"]))

    terms = [("kl", 1.0, lambda s, t, b: kl_div(s, t, temperature=2.0)), ("ce", 0.5, ce)]
    return terms, optax.sgd(0.5, momentum=0.9)


def _student(p, b, k):
    del k
    return b["x"] @ p["w"] + p["b"]


def _teacher(tp, b):
    return b["x"] @ tp["w"]


def _run(mesh=None, global_put=None, local_batch=None):
    params, teacher, batches = _problem()
    terms, tx = _step()
    step = train.make_distill_step(_student, tx, terms=terms, teacher_apply=_teacher, mesh=mesh)
    put = global_put or (lambda t: jax.tree.map(jnp.asarray, t))
    p, s, tp = put(params), put(tx.init(params)), put(teacher)
    losses = []
    for b in batches:
        p, s, m = step(p, s, local_batch(b) if local_batch else b, jax.random.key(0), tp)
        losses.append(float(np.asarray(m["loss"].addressable_data(0))))
    return losses, np.asarray(p["w"].addressable_data(0)).tolist()


def _worker(process_id: int, port: int) -> None:
    from jax.sharding import NamedSharding, PartitionSpec

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8
    mesh = train.data_mesh(jax.devices())
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec(train.DATA_AXIS))

    def global_put(tree):
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(replicated, np.asarray(a)), tree
        )

    def local_batch(b):
        def put(a):
            half = len(a) // 2
            local = a[process_id * half : (process_id + 1) * half]
            return jax.make_array_from_process_local_data(split, local, a.shape)

        return jax.tree.map(put, b)

    losses, w = _run(mesh, global_put, local_batch)
    print(json.dumps({"losses": losses, "w": w}))
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_eight_devices():
    port = _free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": str(ROOT),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    with jax.numpy_dtype_promotion("standard"):
        one = _run()
        mesh = train.data_mesh()
        eight = _run(mesh, lambda t: train.replicate(t, mesh), lambda b: train.shard_batch(b, mesh))
    assert one[0][-1] < one[0][0]
    for losses, w in [(o["losses"], o["w"]) for o in outputs] + [eight]:
        np.testing.assert_allclose(losses, one[0], rtol=1e-5)
        np.testing.assert_allclose(w, one[1], rtol=1e-4, atol=1e-6)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(int(sys.argv[2]), int(sys.argv[3]))
