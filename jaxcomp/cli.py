"""The ``jaxcomp`` command.

``jaxcomp demo``      train, distill, prune, quantize, save and evaluate (the main job)
``jaxcomp evaluate``  restore classifier checkpoints and measure them on a test split
``jaxcomp inspect``   per-layer table of a checkpoint: shape, format, bits, sparsity, bytes
``jaxcomp quantize``  quantize any orbax params checkpoint, without model code
``jaxcomp prune``     magnitude-prune any orbax params checkpoint, without model code

A user's mistake (a bad flag, a missing folder, an unreadable checkpoint) prints
one line on stderr and exits with status 2, without a stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys


class UsageError(ValueError):
    """A bad command line: reported as one line, exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input or machine (not bugs): one line, exit status 2."""
    from jaxcomp.checkpoint import CheckpointError
    from jaxcomp.data import DataError

    return (UsageError, DataError, CheckpointError, ImportError, OSError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default="digits",
        help="digits (embedded default), fashion_mnist, mnist, or tfds:NAME",
    )
    p.add_argument(
        "--data-dir", default=None, help="folder with MNIST-format IDX files (gzipped or not)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxcomp", description="Model compression for JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="compress a classifier end to end and print a table")
    _add_data_flags(demo)
    demo.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="one or more seeds; the table shows the mean over seeds",
    )
    demo.add_argument("--epochs", type=int, default=None, help="epochs per training stage")
    demo.add_argument("--sparsity", type=float, default=0.9, help="target sparsity in [0, 1)")
    demo.add_argument("--bits", type=int, default=4, help="bits of the low-bit row (2-8)")
    demo.add_argument("--out", default="demo_out", help="folder for the table, plot, checkpoints")
    demo.add_argument("--quick", action="store_true", help="few epochs, for a smoke test")

    ev = sub.add_parser("evaluate", help="measure classifier checkpoints on a test split")
    _add_data_flags(ev)
    ev.add_argument("--seed", type=int, default=0, help="seed of the data split")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.add_argument("checkpoints", nargs="+", help="checkpoint folders written by jaxcomp")

    ins = sub.add_parser("inspect", help="per-layer table of a jaxcomp checkpoint")
    ins.add_argument("checkpoint", help="checkpoint folder written by jaxcomp")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")

    qz = sub.add_parser("quantize", help="quantize an orbax or jaxcomp params checkpoint")
    qz.add_argument("input", help="orbax PyTree checkpoint folder or jaxcomp checkpoint")
    qz.add_argument("output", help="folder for the jaxcomp checkpoint to write")
    qz.add_argument("--bits", type=int, default=8, help="bits of the default rule (2-8)")
    qz.add_argument("--group-size", type=int, default=None, help="inputs per scale group")
    qz.add_argument("--asymmetric", action="store_true", help="use a zero point")
    qz.add_argument(
        "--calibration", default="absmax", choices=["absmax", "minmax", "percentile", "mse"]
    )
    qz.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="REGEX=SPEC",
        help="e.g. 'head=none' or 'attn/.*=int8'; first match wins",
    )
    qz.add_argument("--overwrite", action="store_true", help="replace an existing output")

    pr = sub.add_parser("prune", help="magnitude-prune an orbax or jaxcomp params checkpoint")
    pr.add_argument("input", help="orbax PyTree checkpoint folder or jaxcomp checkpoint")
    pr.add_argument("output", help="folder for the jaxcomp checkpoint to write")
    how = pr.add_mutually_exclusive_group(required=True)
    how.add_argument("--sparsity", type=float, help="fraction of each kernel to prune, [0, 1)")
    how.add_argument("--pattern", help="N:M pattern along the input axis, e.g. 2:4")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def _conversion_report(output, sizes) -> None:
    from jaxcomp import checkpoint, report

    print(report.format_table(report.leaf_table(checkpoint.restore(output))))
    print(
        f"\n{sizes['source_bytes']:,} -> {sizes['output_bytes']:,} bytes on disk "
        f"({sizes['ratio']:.3f}x)"
    )


def _quantize(args) -> None:
    from jaxcomp import convert, quant

    try:
        default = quant.QuantConfig(
            bits=args.bits,
            group_size=args.group_size,
            symmetric=not args.asymmetric,
            calibration=args.calibration,
        )
        rules = convert.parse_rules(args.rule, calibration=args.calibration)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    params = convert.load_params(args.input)
    try:
        tree = convert.quantize_params(params, rules, default=default)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    meta = {
        "converted_from": str(args.input),
        "quantize": {
            "default": vars(default),
            "rules": [[p, None if c is None else vars(c)] for p, c in rules],
        },
    }
    sizes = convert.convert_checkpoint(
        args.input, args.output, tree, metadata=meta, overwrite=args.overwrite
    )
    _conversion_report(args.output, sizes)


def _prune(args) -> None:
    from jaxcomp import convert

    if args.sparsity is not None and not 0 <= args.sparsity < 1:
        raise UsageError(f"--sparsity {args.sparsity} is outside [0, 1)")
    params = convert.load_params(args.input)
    try:
        tree, _ = convert.prune_params(
            params, sparsity_level=args.sparsity, pattern=args.pattern or "unstructured"
        )
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    meta = {
        "converted_from": str(args.input),
        "prune": {"sparsity": args.sparsity, "pattern": args.pattern or "unstructured"},
    }
    sizes = convert.convert_checkpoint(
        args.input, args.output, tree, metadata=meta, overwrite=args.overwrite
    )
    _conversion_report(args.output, sizes)


def _inspect(args) -> None:
    from jaxcomp import checkpoint, report

    tree = checkpoint.restore(args.checkpoint)
    rows = report.leaf_table(tree)
    params = report.count_params(tree)
    total = {
        "path": "total",
        "shape": [params],
        "format": "",
        "bits_per_param": 8 * sum(r["bytes"] for r in rows) / max(params, 1),
        "sparsity": 1 - report.count_nonzero(tree) / max(params, 1),
        "bytes": sum(r["bytes"] for r in rows),
    }
    disk = checkpoint.disk_bytes(args.checkpoint)
    meta = checkpoint.read_metadata(args.checkpoint)
    if args.json:
        payload = {
            "leaves": rows,
            "total": total,
            "disk_bytes": disk,
            "metadata": meta.get("metadata", {}),
        }
        print(json.dumps(payload, indent=2))
        return
    print(report.format_table([*rows, total]))
    print(
        f"\n{disk:,} bytes on disk ({8 * disk / max(params, 1):.2f} bits per parameter), "
        f"jaxcomp {meta.get('jaxcomp_version', '?')}"
    )


def _demo(args) -> None:
    from jaxcomp import demo

    config = demo.DemoConfig(
        data=args.data,
        data_dir=args.data_dir,
        seeds=tuple(args.seed),
        epochs=args.epochs,
        sparsity=args.sparsity,
        bits=args.bits,
        out=args.out,
        quick=args.quick,
    )
    try:
        demo.validate(config)
    except ValueError as e:
        raise UsageError(str(e)) from None
    results = demo.run(config)
    print(demo.format_results(results))
    print(f"\nwrote {args.out}/results.json, results.md, accuracy_vs_bytes.png, checkpoints/")


def _evaluate(args) -> None:
    from jaxcomp import demo, report

    rows = demo.evaluate_checkpoints(
        args.checkpoints, data_name=args.data, data_dir=args.data_dir, seed=args.seed
    )
    print(json.dumps(rows, indent=2) if args.json else report.format_table(rows))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxcomp`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    handlers = {
        "demo": _demo,
        "evaluate": _evaluate,
        "inspect": _inspect,
        "quantize": _quantize,
        "prune": _prune,
    }
    try:
        handlers[args.command](args)
    except _user_errors() as e:
        print(f"jaxcomp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxcomp {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
