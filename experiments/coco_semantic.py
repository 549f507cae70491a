"""coco_semantic: U-Net (ResNet-34), DeepLabV3 (ResNet-50) and Fast-SCNN on semantic masks
prepared from COCO by tools/prepare_coco_semantic.py, one model after the other.

Real data: `--data_root` holding train/{images,masks} and val/{images,masks} (and the tool's
classes.json in train/, which gives the class list and count), or `--train_img_dir
--train_mask_dir --val_img_dir --val_mask_dir`; `--models unet deeplabv3 fastscnn` (default: all
three). Each model's run directory is runs/{model}_{metric}_{timestamp}/ with checkpoints in models/.
"""
from typing import Literal

from segjax.config import Config, OptimConfig, TrainConfig, updated
from segjax.tasks.semantic_maps import SemanticDataConfig, SemanticLossConfig, SemanticModelConfig


def get_config(model: Literal["unet", "deeplabv3", "fastscnn"] = "unet", demo: bool = False) -> Config:
    cfg = Config(
        experiment="coco_semantic",
        task="semantic_maps",
        data=SemanticDataConfig(layout="folders", crop_size=512, scale_min=0.75, scale_max=1.25, eval_size=512),
        model=SemanticModelConfig(name=model),
        loss=SemanticLossConfig(ce_weight=1.0),
        optim=OptimConfig(optimizer="adam", lr=1e-4, weight_decay=0.0, scheduler="none"),
        train=TrainConfig(epochs=20, batch_size=8, num_workers=4, run_name="{model}_{metric}_{timestamp}",
                          checkpoint_subdir="models"),
    )
    if demo:  # training on the demo COCO file, prepared into masks by the same tool
        cfg = updated(cfg, model=dict(size="tiny"), data=dict(crop_size=96, eval_size=128), optim=dict(lr=3e-3),
                      train=dict(epochs=20, batch_size=8, num_workers=0, eval_at_start=True))
    return cfg
