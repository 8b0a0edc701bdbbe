"""Post-training quantization against quantization-aware training (STE and LSQ).

The 2x800 MLP student is trained in float32, then quantized to int4 and 2-bit per
output channel: once post-training (round to nearest), and once after a short QAT
fine-tune from the float weights, with the straight-through estimator or with
learned step sizes. Every quantized row is evaluated from real QArrays.

    python examples/qat_fashion_mnist.py [--data fashion_mnist] [--epochs 6] [--quick]

References: Bengio et al., Estimating or Propagating Gradients Through Stochastic
Neurons, 2013; Esser et al., Learned Step Size Quantization, 2020.
"""

import argparse

import jax
import optax

import jaxcomp as jc
from jaxcomp.models import HINTON_SIZES, MLP, init_params


def _train(model, params, ds, epochs, lr, *, config=None, scales=None, seed=0):
    """Adam with a cosine decay; with ``config`` the forward pass fake-quantizes the kernels."""
    trainable = {"params": params, "scales": scales}
    steps = epochs * jc.data.num_batches(ds.train, 128)
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    state = tx.init(trainable)

    def forward(t, x):
        p = t["params"]
        if config is not None:
            p = jc.quant.fake_quantize_tree(p, default=config, scales=t["scales"])
        return model.apply({"params": p}, x)

    @jax.jit
    def step(t, state, x, y):
        def loss(t):
            return optax.softmax_cross_entropy_with_integer_labels(forward(t, x), y).mean()

        updates, state = tx.update(jax.grad(loss)(t), state, t)
        return optax.apply_updates(t, updates), state

    for epoch in range(epochs):
        for x, y in jc.data.batches(ds.train, 128, seed=seed, epoch=epoch):
            trainable, state = step(trainable, state, x, y)
    return trainable["params"], trainable["scales"]


def main(data: str, epochs: int, qat_epochs: int) -> list[dict]:
    ds = jc.data.load(data, seed=0)
    model = MLP(features=HINTON_SIZES["student"], num_classes=ds.num_classes)
    params, _ = _train(model, init_params(model, ds.input_shape), ds, epochs, 1e-3)

    def accuracy(p):
        apply = lambda p, x: model.apply({"params": jc.quant.dequantize_tree(p)}, x)  # noqa: E731
        return jc.train.accuracy(apply, p, ds.test.x, ds.test.y)

    rows = [
        {
            "model": "float32",
            "bits": 32,
            "test_accuracy": accuracy(params),
            "bytes": jc.rules.tree_nbytes(params),
        }
    ]
    for bits in (4, 2):
        config = jc.quant.QuantConfig(bits=bits)
        variants = {"post-training (RTN)": jc.quant.quantize_tree(params, default=config)}
        qat, _ = _train(model, params, ds, qat_epochs, 1e-4, config=config)
        variants["QAT, STE"] = jc.quant.quantize_tree(qat, default=config)
        scales = jc.quant.init_lsq_scales(params, default=config)
        lsq, learned = _train(model, params, ds, qat_epochs, 1e-4, config=config, scales=scales)
        variants["QAT, LSQ"] = jc.quant.lsq_quantize_tree(lsq, learned, default=config)
        for name, q in variants.items():
            rows.append(
                {
                    "model": f"int{bits} per channel, {name}",
                    "bits": bits,
                    "test_accuracy": accuracy(q),
                    "bytes": jc.rules.tree_nbytes(q),
                }
            )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--epochs", type=int, default=6, help="float training epochs")
    parser.add_argument("--qat-epochs", type=int, default=2, help="QAT fine-tune epochs")
    parser.add_argument("--quick", action="store_true", help="1 epoch of each")
    args = parser.parse_args()
    epochs, qat_epochs = (1, 1) if args.quick else (args.epochs, args.qat_epochs)
    table = main(args.data, epochs, qat_epochs)
    print(jc.report.format_table(table, markdown=True))
