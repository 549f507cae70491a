"""Constants and small helpers that several test modules share."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# torchvision resnet18/34/50 without fc.
ENCODER_COUNTS = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032}

# roi_human on 64 px inputs with a head and backbone narrower than the "tiny" size: seconds per run.
ROI_TINY = ["--set", "data.image_size=64", "--set", "data.max_rois=2", "--set", "model.size=tiny",
            "--set", "model.feature_channels=16", "--set", "model.backbone_widths=8,8,16",
            "--set", "model.head_width=8", "--set", "model.head_fine_width=8"]


def load_tool(name: str):
    """A script of tools/ as a module (they are not part of the installed package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def param_count(model) -> int:
    """Parameters of an NNX model (abstract ones from nnx.eval_shape too)."""
    import math

    import jax
    from flax import nnx

    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def run(argv: list[str], **kwargs) -> dict:
    """`python -m segjax.train ARGV` in this process: the run's summary."""
    from segjax.train import resolve_config, train_and_evaluate

    cfg, _ = resolve_config(argv)
    return train_and_evaluate(cfg, **kwargs)
