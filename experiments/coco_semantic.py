"""coco_semantic: U-Net (ResNet-34), DeepLabV3 (ResNet-50) and Fast-SCNN on semantic masks
prepared from COCO by tools/prepare_coco_semantic.py, one model after the other.

Real data: `--data_root` holding train/{images,masks} and val/{images,masks} (and the tool's
classes.json in train/), or `--train_img_dir --train_mask_dir --val_img_dir --val_mask_dir`;
`--models unet deeplabv3 fastscnn` (default: all three). Each model's run directory is
runs/{model}_{metric}_{timestamp}/ with checkpoints in models/.
"""
from segjax.config import Config, OptimConfig, TrainConfig
from segjax.tasks.semantic import SemanticDataConfig, SemanticLossConfig, SemanticModelConfig

MODELS = ("unet", "deeplabv3", "fastscnn")


def get_config() -> Config:
    return Config(
        experiment="coco_semantic",
        task="semantic",
        # num_classes must match the prepared classes.json (81 for all COCO things + background).
        data=SemanticDataConfig(layout="folders", num_classes=81, crop_size=512, scale_min=0.75, scale_max=1.25,
                                eval_size=512),
        model=SemanticModelConfig(name="unet"),
        loss=SemanticLossConfig(ce_weight=1.0),
        optim=OptimConfig(optimizer="adam", lr=1e-4, weight_decay=0.0, scheduler="none"),
        train=TrainConfig(epochs=20, batch_size=8, num_workers=4, run_name="{model}_{metric}_{timestamp}",
                          checkpoint_subdir="models"),
    )


# Applied (before command-line overrides) when no data is given: the demo COCO file has 6
# categories, prepared into masks by the same tool.
DEMO_OVERRIDES = {
    "data.num_classes": "7",
    "model.size": "tiny",
    "data.crop_size": "96",
    "data.eval_size": "128",
    "optim.lr": "3e-3",
    "train.epochs": "20",
    "train.batch_size": "8",
    "train.num_workers": "0",
    "train.eval_at_start": "true",
}
