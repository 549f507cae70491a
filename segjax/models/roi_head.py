"""ROI mask head for human parsing, its built-in stride-8 backbone, and the joined model.

The head takes stride-8 features (C×80×80 from a 640×640 image; C = 1024 for a YOLOv9-E
extractor, or the built-in `StrideEightBackbone`) and boxes, and predicts per-box mask logits
at 56×56.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from segjax.models.layers import ConvNormAct, ResidualBlock, UpConv2x, imagenet_normalize
from segjax.ops.roi_align import roi_align

# `roi_human_model` variants: "full" the published head on C=1024 stride-8 features (a YOLOv9-E
# extractor's, or the backbone's), "tiny" narrow and shallow (tests, demos).
SIZES = {
    "full": dict(feature_channels=1024, backbone_widths=(64, 128, 256), backbone_blocks=(1, 2, 2), head_width=256,
                 head_fine_width=128),
    "tiny": dict(feature_channels=64, backbone_widths=(16, 32, 64), backbone_blocks=(1, 1, 1), head_width=32,
                 head_fine_width=16),
}


class RoiMaskHead(nnx.Module):
    """Mask logits for each box from stride-8 features (LayerNorm over channels throughout).

    Layers, for features [N, Hf, Wf, in_channels] and rois [K, 5]:
      1. RoIAlign to roi_size×roi_size (28; spatial_scale 1/8, aligned=True).
      2. 1×1 conv → LayerNorm → ReLU to `width`.
      3. Two residual blocks: 3×3 conv-LN-ReLU, 3×3 conv-LN, add input, ReLU.
      4. ConvTranspose 2×2 stride 2 (`UpConv2x`) to `width` (56×56), refine: 3×3 conv-LN-ReLU.
      5. ConvTranspose 2×2 stride 2 (`UpConv2x`) to `fine_width` (112×112), refine: 3×3 conv-LN-ReLU.
      6. Fusion at 56×56: 3×3 stride-2 conv of the 112 map to `width`, concatenated with the
         56 map (56 map first), 3×3 conv-LN-ReLU to `width`.
      7. 1×1 conv to `num_classes`.
    All convolutions carry a bias (as PyTorch's default). Output: [K, 2·roi_size, 2·roi_size,
    num_classes] logits in the compute dtype.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        width: int = 256,
        fine_width: int = 128,
        num_classes: int = 3,
        roi_size: int = 28,
        spatial_scale: float = 1 / 8,
        sampling_ratio: int = -1,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.roi_size = roi_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.reduce = ConvNormAct(in_channels, width, 1, norm="layer", **precision)
        self.blocks = nnx.List(
            [ResidualBlock(width, norm="layer", **precision) for _ in range(2)])
        self.up_coarse = UpConv2x(width, width, **precision)
        self.refine_coarse = ConvNormAct(width, width, 3, norm="layer", **precision)
        self.up_fine = UpConv2x(width, fine_width, **precision)
        self.refine_fine = ConvNormAct(fine_width, fine_width, 3, norm="layer", **precision)
        self.down = nnx.Conv(fine_width, width, (3, 3), 2, padding=1, **precision)
        self.fuse = ConvNormAct(2 * width, width, 3, norm="layer", **precision)
        self.classifier = nnx.Conv(width, num_classes, (1, 1), **precision)

    def __call__(self, features: jax.Array, rois: jax.Array) -> jax.Array:
        """features [N, Hf, Wf, C], rois [K, 5] (batch index, x1, y1, x2, y2 in image pixels) or
        [N, R, 4] (R boxes per image: the same, N times cheaper; see ops.roi_align)."""
        x = roi_align(
            features, rois, (self.roi_size, self.roi_size), self.spatial_scale,
            sampling_ratio=self.sampling_ratio, aligned=True)
        x = self.reduce(x)
        for block in self.blocks:
            x = block(x)
        coarse = self.refine_coarse(self.up_coarse(x))
        fine = self.refine_fine(self.up_fine(coarse))
        x = self.fuse(jnp.concatenate([coarse, self.down(fine)], axis=-1))
        return self.classifier(x)


class StrideEightBackbone(nnx.Module):
    """Compact residual conv net (conv-BatchNorm-ReLU) giving stride-8 features.

    Three stages, each a 3×3 stride-2 ConvNormAct to `widths[i]` followed by `blocks[i]`
    residual blocks (the first stage is the stem), then a 1×1 conv to `out_channels`.
    Takes RGB images in [0, 1] and applies the ImageNet mean/std itself, so an exported graph
    takes [0, 1] images. Any H, W works: with PyTorch-style padding every stride-2 conv gives
    ceil(size / 2) rows, so the output is [N, ceil(H / 8), ceil(W / 8), out_channels].
    """

    def __init__(
        self,
        *,
        widths: tuple[int, int, int],
        blocks: tuple[int, int, int],
        out_channels: int,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(widths) != 3 or len(blocks) != 3:
            raise ValueError(f"need 3 stages for stride 8, got widths={widths}, blocks={blocks}")
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        stages = []
        in_channels = 3
        for width, depth in zip(widths, blocks):
            # No conv bias: the BatchNorm that follows has its own.
            stages.append(nnx.Sequential(
                ConvNormAct(in_channels, width, 3, 2, norm="batch", use_bias=False, **precision),
                *[ResidualBlock(width, norm="batch", use_bias=False, **precision)
                  for _ in range(depth)]))
            in_channels = width
        self.stages = nnx.List(stages)
        self.project = nnx.Conv(in_channels, out_channels, (1, 1), **precision)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = imagenet_normalize(images)
        for stage in self.stages:
            x = stage(x)
        return self.project(x)


class RoiHumanModel(nnx.Module):
    """ROI mask head on either the built-in backbone or precomputed (frozen ONNX) features."""

    def __init__(self, head: RoiMaskHead, backbone: StrideEightBackbone | None = None):
        self.head = head
        self.backbone = backbone

    def __call__(self, inputs: jax.Array, rois: jax.Array) -> jax.Array:
        """inputs: images [N, H, W, 3] in [0, 1] with a backbone, else features [N, Hf, Wf, C]."""
        features = inputs if self.backbone is None else self.backbone(inputs)
        return self.head(features, rois)


def roi_human_model(*, feature_channels: int, backbone_widths: tuple[int, int, int],
                    backbone_blocks: tuple[int, int, int], head_width: int, head_fine_width: int,
                    num_classes: int = 3, sampling_ratio: int = -1, backbone: bool = True,
                    dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                    rngs: nnx.Rngs) -> RoiHumanModel:
    """The head on `feature_channels` stride-8 features, on the built-in backbone unless
    `backbone` is False (features from an extractor); sizes from `SIZES`."""
    precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    head = RoiMaskHead(feature_channels, width=head_width, fine_width=head_fine_width, num_classes=num_classes,
                       sampling_ratio=sampling_ratio, **precision)
    stride_eight = StrideEightBackbone(widths=backbone_widths, blocks=backbone_blocks, out_channels=feature_channels,
                                       **precision) if backbone else None
    return RoiHumanModel(head, stride_eight)
