"""Shared test set-up: cheap CPU compiles, the real sample data, the PyTorch reference libraries."""
import os
import sys
import tempfile
import types
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


@pytest.fixture
def ref():
    """torch, torchvision, timm and smp on the CPU-only torch build, torch seeded per test.

    torchvision's compiled ops do not load against it; stubbing their registration module
    leaves its pure-Python models (all these tests need) working. See STACK_NOTES.
    """
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import segmentation_models_pytorch
    import timm
    import torch
    import torchvision
    torch.manual_seed(0)
    return types.SimpleNamespace(torch=torch, torchvision=torchvision, timm=timm,
                                 smp=segmentation_models_pytorch)
