"""Shared test set-up: cheap CPU compiles and the path to the real sample data."""
import os
import tempfile
from pathlib import Path

import jax
import pytest

# CPU compiles dominate test time; the Flax examples trade run-time speed for compile speed.
jax.config.update("jax_disable_most_optimizations", True)
# Many tests compile identical programs (the trainer runs the same tiny config several times);
# a per-session persistent cache, shared with subprocesses through the environment, skips repeats.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="segjax-jax-cache-"))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REALDATA = Path(os.environ.get("SEGJAX_REALDATA", Path(__file__).resolve().parents[2] / "shared" / "realdata"))


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.exists():
        raise FileNotFoundError(f"real sample data not found at {REALDATA}; set SEGJAX_REALDATA")
    return REALDATA
