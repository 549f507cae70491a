"""Shared test set-up: cheap CPU compiles and paths to the real sample data."""
import os
from pathlib import Path

import jax
import pytest

# CPU compiles dominate test time; the Flax examples trade run-time speed for compile speed.
jax.config.update("jax_disable_most_optimizations", True)

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
if not REALDATA.exists():  # a checkout elsewhere can point at the samples explicitly
  REALDATA = Path(os.environ.get("SEGJAX_REALDATA", REALDATA))


@pytest.fixture(scope="session")
def realdata() -> Path:
  if not REALDATA.exists():
    pytest.skip(f"real sample data not found at {REALDATA}")
  return REALDATA
