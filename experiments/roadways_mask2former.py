"""roadways_mask2former: Mask2Former (Swin-T) fine-tuned on road scenes, 26 IDD level-3 classes.

Real data: `--data_root ROOT` holding leftImg8bit/ + gtFine/ (IDD: level-3 label PNGs, the
default), or images/ + labels/ with split lists (tools/split_dataset.py); `--set
data.train_list=OUT/subset.txt` trains on the ranked subset of tools/select_subset.py. Start
from a transformers checkpoint with `--init_from hf:DIR` (a `save_pretrained` directory; the
class head is re-initialised when its class count differs). As the original: Adam, lr 5e-5,
batch 8, 2 epochs, backbone and pixel decoder frozen (`--set model.train_parts=...`).

Without data the demo variant applies: the synthetic road scenes, split and ranked by the tools'
code, and a tiny Mask2Former from a tiny random "pretrained" transformers directory, a few
minutes on 2 CPU cores.

`--mode paper` is Mask2Former's Cityscapes semantic recipe (configs/cityscapes/semantic-segmentation/
maskformer2_R50_bs16_90k.yaml with the Swin-T backbone): the whole model trained, batch 16, 512×1024
crops of images resized to 0.5–2.0 × 1024 high, flip, AdamW 1e-4 with weight decay 0.05 and the
`mask2former` parameter groups (backbone lr ×0.1, no decay on norms and embeddings), poly 0.9, the
gradient's global norm over the full model clipped at 0.01, validation on whole 1024×2048 images.
90k iterations are 487 epochs of Cityscapes' 2975 training images (185 steps each: 90,095 updates);
set `--epochs` to 90000 × 16 / your image count for another set.
"""
from typing import Literal

from segjax.config import Config, OptimConfig, TrainConfig, updated
from segjax.data.demo import default_demo_root
from segjax.tasks.query_semantic import DEMO_PRETRAINED, Mask2FormerLossConfig, Mask2FormerModelConfig, RoadDataConfig


def get_config(mode: Literal["train", "test", "paper"] = "train", demo: bool = False) -> Config:
    cfg = Config(
        experiment="roadways_mask2former",
        task="query_semantic",
        data=RoadDataConfig(),
        model=Mask2FormerModelConfig(size="full"),
        loss=Mask2FormerLossConfig(),
        optim=OptimConfig(optimizer="adam", lr=5e-5, weight_decay=0.0, scheduler="none"),
        train=TrainConfig(epochs=2, batch_size=8, num_workers=4),
    )
    if demo:  # the road demo (no data given), from the demo's tiny random "pretrained" directory:
        # a random start has nothing worth freezing, so every part trains.
        cfg = updated(cfg, data=dict(crop=(128, 128), base_height=128, scale_min=0.75, scale_max=1.5,
                                     eval_size=(128, 256)),
                      # size: the architecture of the demo's "pretrained" directory (its hf_config).
                      model=dict(size="tiny", train_parts=("backbone", "pixel_decoder", "transformer")),
                      loss=dict(num_points=1024), optim=dict(lr=1e-3),
                      train=dict(epochs=20, batch_size=8, num_workers=0, eval_at_start=True,
                                 init_from=f"hf:{default_demo_root() / 'roads' / DEMO_PRETRAINED}"))
    if mode == "paper":
        cfg = updated(cfg, data=dict(classes="cityscapes", label_ids="cityscapes", label_suffix="_gtFine_labelIds.png",
                                     crop=(512, 1024), base_height=1024, scale_min=0.5, scale_max=2.0, flip=True,
                                     eval_size=(1024, 2048)),
                      model=dict(train_parts=("backbone", "pixel_decoder", "transformer")),
                      optim=dict(optimizer="adamw", lr=1e-4, weight_decay=0.05, param_groups=("mask2former",),
                                 scheduler="poly", power=0.9, gradient_clip=0.01),
                      train=dict(batch_size=16, epochs=487, validate_every=25, save_every=5),
                      eval=dict(resize=(1024, 2048), mode="whole"))
        if demo:  # the recipe on the road demo, at its size: the recipe's options, a few steps
            cfg = updated(cfg, data=dict(classes="idd_level3", label_ids="train", label_suffix="", crop=(128, 128),
                                         base_height=128, eval_size=(128, 256)),
                          train=dict(batch_size=8, epochs=2, validate_every=1, save_every=1),
                          eval=dict(resize=(128, 256)))
    if mode == "test":
        cfg = updated(cfg, train=dict(test_only=True, init_from="latest", num_visualizations=8))
    return cfg
