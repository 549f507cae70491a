"""Shared test set-up: cheap CPU compiles and the path to the real sample data."""
import os
from pathlib import Path

import jax
import pytest

# CPU compiles dominate test time; the Flax examples trade run-time speed for compile speed.
jax.config.update("jax_disable_most_optimizations", True)

REALDATA = Path(os.environ.get("SEGJAX_REALDATA", Path(__file__).resolve().parents[2] / "shared" / "realdata"))


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.exists():
        raise FileNotFoundError(f"real sample data not found at {REALDATA}; set SEGJAX_REALDATA")
    return REALDATA
