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
"""
from typing import Literal

from segjax.config import Config, OptimConfig, TrainConfig, updated
from segjax.data.demo import default_demo_root
from segjax.tasks.query_semantic import DEMO_PRETRAINED, Mask2FormerLossConfig, Mask2FormerModelConfig, RoadDataConfig


def get_config(mode: Literal["train", "test"] = "train", demo: bool = False) -> Config:
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
    if mode == "test":
        cfg = updated(cfg, train=dict(test_only=True, init_from="latest", num_visualizations=8))
    return cfg
