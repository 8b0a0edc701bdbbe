"""Converting plain orbax params checkpoints: `jaxcomp quantize` and `jaxcomp prune`."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcomp import checkpoint, cli, convert, quant
from jaxcomp.models import MLP, init_params


@pytest.fixture(scope="module")
def orbax_ckpt(tmp_path_factory):
    """A params checkpoint written by a plain Flax + orbax training loop."""
    params = {"params": init_params(MLP(features=(128, 64)), (256,), seed=3)}
    path = tmp_path_factory.mktemp("orbax") / "step_100"
    saver = ocp.StandardCheckpointer()
    saver.save(path, params)
    saver.wait_until_finished()
    return path, jax.device_get(params)


def test_parse_quant_spec():
    assert convert.parse_quant_spec("int4:g128:asym:mse") == quant.QuantConfig(
        bits=4, group_size=128, symmetric=False, calibration="mse"
    )
    assert convert.parse_quant_spec("int8:tensor").channel_axis is None
    assert convert.parse_quant_spec("nf4:g64") == quant.QuantConfig(
        bits=4, group_size=64, fmt="nf4"
    )
    assert convert.parse_quant_spec("none") is None
    for bad, msg in [
        ("int9", "bits is 9"),
        ("float3", "starts with 'float3'"),
        ("int4:g0", "group_size is 0"),
        ("int4:fast", "unknown option 'fast'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            convert.parse_quant_spec(bad)
    with pytest.raises(ValueError, match="not of the form REGEX=SPEC"):
        convert.parse_rules(["int8"])


def test_quantize_command_matches_library(orbax_ckpt, tmp_path, capsys):
    src, params = orbax_ckpt
    out = tmp_path / "int4"
    status = cli.main(
        [
            "quantize",
            str(src),
            str(out),
            "--bits",
            "4",
            "--group-size",
            "64",
            "--rule",
            "Dense_2=int8",
        ]
    )
    assert status == 0
    tree = checkpoint.restore(out)
    p = params["params"]
    expected = quant.quantize(p["Dense_0"]["kernel"], bits=4, group_size=64)
    np.testing.assert_array_equal(tree["params"]["Dense_0"]["kernel"].codes, expected.codes)
    assert tree["params"]["Dense_2"]["kernel"].bits == 8
    np.testing.assert_array_equal(tree["params"]["Dense_0"]["bias"], p["Dense_0"]["bias"])
    meta = checkpoint.read_metadata(out)["metadata"]
    assert meta["quantize"]["rules"][0][0] == "Dense_2"
    report = capsys.readouterr().out
    assert "params/Dense_1/kernel" in report and "int4 g64" in report and "bytes on disk" in report


def test_prune_command_two_four(orbax_ckpt, tmp_path):
    src, params = orbax_ckpt
    assert cli.main(["prune", str(src), str(tmp_path / "p"), "--pattern", "2:4"]) == 0
    tree = checkpoint.restore(tmp_path / "p")
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        k = np.asarray(tree["params"][name]["kernel"])
        groups = (k.reshape(-1, 4, k.shape[1]) != 0).sum(axis=1)
        assert (groups <= 2).all()
        kept = np.abs(np.asarray(params["params"][name]["kernel"])).reshape(-1, 4, k.shape[1])
        # the kept entries are the two largest magnitudes of each group
        np.testing.assert_array_equal(
            np.sort(kept, axis=1)[:, 2:],
            np.sort(np.abs(k.reshape(-1, 4, k.shape[1])), axis=1)[:, 2:],
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize", "{src}", "{out}", "--group-size", "100"], "Dense_0/kernel: group_size 100"),
        (["quantize", "{src}", "{out}", "--rule", "x=int9"], "'int9': bits is 9"),
        (["quantize", "{missing}", "{out}"], "not an existing folder"),
        (["quantize", "{empty}", "{out}"], "is not a readable orbax or jaxcomp checkpoint"),
        (["prune", "{src}", "{out}", "--sparsity", "1.5"], "--sparsity 1.5 is outside [0, 1)"),
        (["prune", "{src}", "{out}", "--pattern", "4:2"], "4:2"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(orbax_ckpt, tmp_path, capsys, args, message):
    src, _ = orbax_ckpt
    (tmp_path / "empty").mkdir()
    names = {
        "src": src,
        "out": tmp_path / "out",
        "missing": tmp_path / "missing",
        "empty": tmp_path / "empty",
    }
    assert cli.main([a.format(**names) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_nan_leaf_is_named(tmp_path):
    params = {"enc": {"kernel": jnp.full((8, 4), jnp.nan)}}
    with pytest.raises(ValueError, match="enc/kernel: the tensor holds NaN or Inf"):
        convert.quantize_params(params, default=quant.QuantConfig(bits=8))
