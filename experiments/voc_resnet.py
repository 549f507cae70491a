"""voc_resnet: ResNet18/34/50 encoder-decoder on PASCAL VOC 2012, 21 classes.

Real data: `--data_root` pointing at a directory holding VOCdevkit/VOC2012 (or at VOC2012
itself); `--backbone resnet18|resnet34|resnet50`. Modes: `--mode sanity` overfits one image,
`--mode train` (the default) trains, `--mode test` validates the latest run's best checkpoint and
writes prediction_*.png (image, ground truth, prediction).
"""
from typing import Literal

from segjax.config import Config, OptimConfig, TrainConfig, updated
from segjax.tasks.semantic_maps import SemanticDataConfig, SemanticLossConfig, SemanticModelConfig


def get_config(mode: Literal["train", "sanity", "test"] = "train", demo: bool = False) -> Config:
    cfg = Config(
        experiment="voc_resnet",
        task="semantic_maps",
        data=SemanticDataConfig(layout="voc", num_classes=21, crop_size=224, eval_size=512),
        model=SemanticModelConfig(name="resnet34"),
        loss=SemanticLossConfig(ce_weight=1.0),
        optim=OptimConfig(optimizer="sgd", lr=0.006, momentum=0.9, weight_decay=1e-4, scheduler="none"),
        train=TrainConfig(epochs=50, batch_size=4, num_workers=4),
    )
    if demo:  # training on the demo data (no data paths given)
        cfg = updated(cfg, model=dict(size="tiny"), data=dict(crop_size=96, eval_size=128), optim=dict(lr=0.05),
                      train=dict(epochs=30, batch_size=8, num_workers=0, eval_at_start=True))
    if mode == "sanity":
        cfg = updated(cfg, data=dict(overfit_one=True),
                      train=dict(epochs=100, validate_every=25, eval_at_start=True))
    elif mode == "test":
        cfg = updated(cfg, train=dict(test_only=True, init_from="latest", num_visualizations=8))
    return cfg
