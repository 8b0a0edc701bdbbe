"""Test set-up: 8 host CPU devices, strict dtype promotion, fixed seeds."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True)
def _fixed_seed():
    np.random.seed(0)


@pytest.fixture
def rng():
    """A numpy Generator with a fixed seed, fresh for every test."""
    return np.random.default_rng(0)


def require_data(path_exists: bool, reason: str):
    """Skips when local data is absent, unless JAXCOMP_REQUIRE_DATA=1 makes it a failure."""
    if path_exists:
        return
    if os.environ.get("JAXCOMP_REQUIRE_DATA") == "1":
        pytest.fail(f"JAXCOMP_REQUIRE_DATA=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def standard_promotion():
    """Runs a test under standard dtype promotion.

    optax 0.2.8's Adam bias correction computes ``b1 ** count`` with a Python float and
    an int32 count, which strict promotion rejects; tests that step Adam use this.
    """
    with jax.numpy_dtype_promotion("standard"):
        yield
