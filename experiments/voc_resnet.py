"""voc_resnet: ResNet18/34/50 encoder-decoder on PASCAL VOC 2012, 21 classes.

Real data: `--data_root` pointing at a directory holding VOCdevkit/VOC2012 (or at VOC2012
itself); `--backbone resnet18|resnet34|resnet50`. Modes: `--mode sanity` overfits one image,
`--mode train` (the default) trains, `--mode test` validates the latest run's best checkpoint and
writes prediction_*.png (image, ground truth, prediction).
"""
from segjax.config import Config, OptimConfig, TrainConfig
from segjax.tasks.semantic import SemanticDataConfig, SemanticLossConfig, SemanticModelConfig


def get_config() -> Config:
    return Config(
        experiment="voc_resnet",
        task="semantic",
        data=SemanticDataConfig(layout="voc", num_classes=21, crop_size=224, eval_size=512),
        model=SemanticModelConfig(name="resnet34"),
        loss=SemanticLossConfig(ce_weight=1.0),
        optim=OptimConfig(optimizer="sgd", lr=0.006, momentum=0.9, weight_decay=1e-4, scheduler="none"),
        train=TrainConfig(epochs=50, batch_size=4, num_workers=4),
    )


MODES = {
    "sanity": {"data.overfit_one": "true", "train.epochs": "100", "train.validate_every": "25",
               "train.eval_at_start": "true"},
    "train": {},
    "test": {"train.test_only": "true", "train.init_from": "latest", "train.num_visualizations": "8"},
}

# Applied (before --mode and command-line overrides) when no data is given.
DEMO_OVERRIDES = {
    "model.size": "tiny",
    "data.crop_size": "96",
    "data.eval_size": "128",
    "optim.lr": "0.05",
    "train.epochs": "30",
    "train.batch_size": "8",
    "train.num_workers": "0",
    "train.eval_at_start": "true",
}
