"""PyTorch ports of the segjax models that have no PyTorch original to import, for benchmarks.

Each port has segjax's layout (same layers, widths, strides, paddings, normalisation and
parameter count; tools/against_torch.py checks the count) in plain PyTorch, NCHW, taking RGB
images in [0, 1] and normalising inside like the segjax models:
  EncoderDecoder   voc_resnet: torchvision ResNet encoder, ConvTranspose2d(k=2, s=2) decoder
  FastSCNN         segjax.models.fast_scnn
  HybridQuery      timm darknet53 features, segjax.models.fpn, the query decoder of
                   segjax.models.hybrid (nn.MultiheadAttention, post-norm DETR layers)
  RoiMaskHead      segjax.models.roi_head; RoIAlign in the same separable one-hot einsum form
                   as segjax.ops.roi_align (torchvision's compiled roi_align does not load
                   against the CPU torch build, see STACK_NOTES)
torch, torchvision and timm are imported by the caller (the torchvision stub must come first).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = images.new_tensor(MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


def conv_norm_act(cin, cout, k=3, stride=1, *, dilation=1, groups=1, act=True, bias=False,
                  norm="batch"):
    """segjax.models.layers.ConvNormAct."""
    layers = [nn.Conv2d(cin, cout, k, stride, padding=dilation * (k // 2), dilation=dilation,
                        groups=groups, bias=bias)]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(cout))
    elif norm == "layer":
        layers.append(ChannelLayerNorm(cout))
    if act is True:
        layers.append(nn.ReLU(inplace=True))
    elif act:
        layers.append(act)
    return nn.Sequential(*layers)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an NCHW map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class UpBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, 2)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x, size):
        return F.relu(self.bn(self.up(x)[:, :, :size[0], :size[1]]))


class EncoderDecoder(nn.Module):
    """segjax.models.encoder_decoder.EncoderDecoder."""

    def __init__(self, resnet: nn.Module, num_classes: int, decoder_channels=(256, 128, 64, 32, 32)):
        super().__init__()
        self.encoder = resnet
        c4 = resnet.fc.in_features
        c1 = c4 // 8  # layer1's width
        resnet.fc = nn.Identity()  # the encoder has no classifier
        d4, d3, d2, d1, d0 = decoder_channels
        self.up4, self.up3, self.up2 = UpBlock(c4, d4), UpBlock(d4, d3), UpBlock(d3, d2)
        self.fuse = conv_norm_act(d2 + c1, d2, 3)
        self.up1, self.up0 = UpBlock(d2, d1), UpBlock(d1, d0)
        self.classifier = nn.Conv2d(d0, num_classes, 1)

    def forward(self, images):
        net = self.encoder
        stem = net.relu(net.bn1(net.conv1(normalize(images))))
        c1 = net.layer1(net.maxpool(stem))
        c2 = net.layer2(c1)
        c3 = net.layer3(c2)
        c4 = net.layer4(c3)
        x = self.up4(c4, c3.shape[2:])
        x = self.up3(x, c2.shape[2:])
        x = self.fuse(torch.cat([self.up2(x, c1.shape[2:]), c1], 1))
        x = self.up1(x, stem.shape[2:])
        return self.classifier(self.up0(x, images.shape[2:]))


class Normalized(nn.Module):
    """A PyTorch original that expects normalised input, fed [0, 1] images (as segjax's)."""

    def __init__(self, net: nn.Module, output: str | None = None):
        super().__init__()
        self.net, self.output = net, output

    def forward(self, images):
        out = self.net(normalize(images))
        return out[self.output] if self.output else out


# --- Fast-SCNN --------------------------------------------------------------------------------

class DSConv(nn.Sequential):
    def __init__(self, cin, cout, stride=1):
        super().__init__(conv_norm_act(cin, cin, 3, stride, groups=cin, act=False),
                         conv_norm_act(cin, cout, 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t=6):
        super().__init__()
        hidden = cin * t
        self.block = nn.Sequential(conv_norm_act(cin, hidden, 1),
                                   conv_norm_act(hidden, hidden, 3, stride, groups=hidden),
                                   conv_norm_act(hidden, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return x + out if self.residual else out


class PyramidPooling(nn.Module):
    def __init__(self, cin, cout, bins=(1, 2, 3, 6)):
        super().__init__()
        self.bins = bins
        self.branches = nn.ModuleList(conv_norm_act(cin, cin // len(bins), 1) for _ in bins)
        self.out = conv_norm_act(cin + len(bins) * (cin // len(bins)), cout, 1)

    def forward(self, x):
        size = x.shape[2:]
        pooled = [F.interpolate(branch(F.adaptive_avg_pool2d(x, b)), size, mode="bilinear")
                  for b, branch in zip(self.bins, self.branches)]
        return self.out(torch.cat([x, *pooled], 1))


class FeatureFusion(nn.Module):
    def __init__(self, high, low, cout, scale=4):
        super().__init__()
        self.depthwise = conv_norm_act(low, low, 3, dilation=scale, groups=low)
        self.low_project = conv_norm_act(low, cout, 1, act=False)
        self.high_project = conv_norm_act(high, cout, 1, act=False)

    def forward(self, high, low):
        low = F.interpolate(low, high.shape[2:], mode="bilinear")
        return F.relu(self.high_project(high) + self.low_project(self.depthwise(low)))


class FastSCNN(nn.Module):
    """segjax.models.fast_scnn.FastSCNN at the paper's widths."""

    def __init__(self, num_classes, downsample=(32, 48, 64), blocks=(64, 96, 128), fusion=128):
        super().__init__()
        c1, c2, c3 = downsample
        self.learning_to_downsample = nn.Sequential(
            conv_norm_act(3, c1, 3, 2), DSConv(c1, c2, 2), DSConv(c2, c3, 2))
        layers, cin = [], c3
        for cout, stride in zip(blocks, (2, 2, 1)):
            for i in range(3):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.bottlenecks = nn.Sequential(*layers)
        self.ppm = PyramidPooling(cin, cin)
        self.fusion = FeatureFusion(c3, cin, fusion)
        self.classifier = nn.Sequential(DSConv(fusion, fusion), DSConv(fusion, fusion),
                                        nn.Dropout(0.1), nn.Conv2d(fusion, num_classes, 1))

    def forward(self, images):
        high = self.learning_to_downsample(normalize(images))
        x = self.fusion(high, self.ppm(self.bottlenecks(high)))
        return F.interpolate(self.classifier(x), images.shape[2:], mode="bilinear")


# --- hybrid: DarkNet-53 + FPN + query decoder -----------------------------------------------------

class FPN(nn.Module):
    def __init__(self, in_channels, channels=256):
        super().__init__()
        c3, c4, c5 = in_channels
        self.lateral5 = conv_norm_act(c5, channels, 1)
        self.fuse4 = conv_norm_act(channels + c4, channels, 3)
        self.fuse3 = conv_norm_act(channels + c3, channels, 3)

    def forward(self, c3, c4, c5):
        p5 = self.lateral5(c5)
        p4 = self.fuse4(torch.cat([F.interpolate(p5, c4.shape[2:], mode="bilinear"), c4], 1))
        return self.fuse3(torch.cat([F.interpolate(p4, c3.shape[2:], mode="bilinear"), c3], 1))


def sine_positions(height, width, d_model, temperature=10000.0) -> np.ndarray:
    """segjax.models.hybrid.sine_positions (DETR's normalised sine encoding)."""
    num_feats = d_model // 2
    y = np.arange(1, height + 1, dtype=np.float32) / (height + 1e-6) * 2 * np.pi
    x = np.arange(1, width + 1, dtype=np.float32) / (width + 1e-6) * 2 * np.pi
    dim_t = temperature ** (2 * (np.arange(num_feats) // 2) / num_feats)

    def encode(pos):
        pos = pos[:, None] / dim_t
        return np.stack([np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])], axis=2).reshape(len(pos), -1)

    pos_y = np.broadcast_to(encode(y)[:, None, :], (height, width, num_feats))
    pos_x = np.broadcast_to(encode(x)[None, :, :], (height, width, num_feats))
    return np.concatenate([pos_y, pos_x], axis=-1).reshape(height * width, d_model).astype(np.float32)


class DecoderLayer(nn.Module):
    def __init__(self, d_model, heads, ffn, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.linear1, self.linear2 = nn.Linear(d_model, ffn), nn.Linear(ffn, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, query_pos, memory, memory_pos):
        q = queries + query_pos
        queries = self.norm1(queries + self.dropout(self.self_attn(q, q, queries, need_weights=False)[0]))
        attended = self.cross_attn(queries + query_pos, memory + memory_pos, memory, need_weights=False)[0]
        queries = self.norm2(queries + self.dropout(attended))
        hidden = self.dropout(F.relu(self.linear1(queries)))
        return self.norm3(queries + self.dropout(self.linear2(hidden)))


class HybridQuery(nn.Module):
    """segjax.models.hybrid.HybridQueryModel at full size on timm's darknet53 features."""

    def __init__(self, darknet: nn.Module, num_classes, fpn_channels=256, num_queries=100,
                 d_model=384, num_layers=6, num_heads=6, ffn=2048, dropout=0.1):
        super().__init__()
        self.backbone = darknet
        self.fpn = FPN(darknet.feature_info.channels(), fpn_channels)
        self.patchify = nn.Conv2d(fpn_channels, d_model, 2, 2)
        self.query_feat = nn.Embedding(num_queries, d_model)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.layers = nn.ModuleList(DecoderLayer(d_model, num_heads, ffn, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model),
                                        nn.ReLU(), nn.Linear(d_model, d_model))
        self.mask_features = nn.Conv2d(fpn_channels, d_model, 1)

    def forward(self, images):
        p3 = self.fpn(*self.backbone(normalize(images)))
        tokens = self.patchify(p3)
        b, d, th, tw = tokens.shape
        memory = tokens.flatten(2).transpose(1, 2)
        memory_pos = torch.from_numpy(sine_positions(th, tw, d))[None]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        queries = self.query_feat.weight[None].expand(b, -1, -1)
        for layer in self.layers:
            queries = layer(queries, query_pos, memory, memory_pos)
        queries = self.norm(queries)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(queries), self.mask_features(p3))
        return self.class_embed(queries), F.interpolate(masks, images.shape[2:], mode="bilinear")


# --- ROI head -----------------------------------------------------------------------------------

def _axis_weights(start, bin_size, out_len, in_len, grid, max_grid):
    """segjax.ops.roi_align._axis_weights: averaged bilinear weights [K, out_len, in_len]."""
    start, bin_size = start[:, None, None], bin_size[:, None, None]
    bins = torch.arange(out_len, dtype=start.dtype)[None, :, None]
    points = torch.arange(max_grid, dtype=start.dtype)[None, None, :]
    grid = grid.reshape(-1, 1, 1)
    divisor = grid.clamp(min=1.0)
    pos = start + bins * bin_size + (points + 0.5) * bin_size / divisor
    keep = (pos >= -1) & (pos <= in_len) & (points < grid)
    pos = pos.clamp(0.0, in_len - 1.0)
    tent = (1.0 - (pos[..., None] - torch.arange(in_len, dtype=pos.dtype)).abs()).clamp(min=0.0)
    return torch.where(keep[..., None], tent, 0.0).sum(2) / divisor


def roi_align(features, rois, size, scale):
    """Aligned RoIAlign, adaptive sampling, NCHW features, rois [K, 5] or [N, R, 4] boxes per
    image, as segjax.ops.roi_align."""
    n, c, h, w = features.shape
    boxes = rois.reshape(-1, 4) if rois.dim() == 3 else rois[:, 1:]
    x1, y1, x2, y2 = (boxes[:, i] * scale - 0.5 for i in range(4))
    bin_h, bin_w = (y2 - y1) / size, (x2 - x1) / size
    max_h, max_w = max(1, math.ceil(h / size)), max(1, math.ceil(w / size))
    wy = _axis_weights(y1, bin_h, size, h, bin_h.ceil().clamp(max=max_h), max_h)
    wx = _axis_weights(x1, bin_w, size, w, bin_w.ceil().clamp(max=max_w), max_w)
    if rois.dim() == 3:
        mid = torch.einsum("nryh,nchw->nrcyw", wy.reshape(n, -1, size, h), features)
        out = torch.einsum("nrxw,nrcyw->nrcyx", wx.reshape(n, -1, size, w), mid)
        return out.reshape(-1, c, size, size)
    select = (rois[:, :1].long() == torch.arange(n)[None]).to(features.dtype)
    mid = torch.einsum("kynh,nchw->kcyw", torch.einsum("kn,kyh->kynh", select, wy), features)
    return torch.einsum("kxw,kcyw->kcyx", wx, mid)


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = conv_norm_act(c, c, 3, bias=True, norm="layer")
        self.conv2 = conv_norm_act(c, c, 3, bias=True, norm="layer", act=False)

    def forward(self, x):
        return F.relu(x + self.conv2(self.conv1(x)))


class RoiMaskHead(nn.Module):
    """segjax.models.roi_head.RoiMaskHead at full size."""

    def __init__(self, in_channels=1024, width=256, fine_width=128, num_classes=3, roi_size=28):
        super().__init__()
        layer = dict(bias=True, norm="layer")
        self.roi_size = roi_size
        self.reduce = conv_norm_act(in_channels, width, 1, **layer)
        self.blocks = nn.Sequential(ResidualBlock(width), ResidualBlock(width))
        self.up_coarse = nn.ConvTranspose2d(width, width, 2, 2)
        self.refine_coarse = conv_norm_act(width, width, 3, **layer)
        self.up_fine = nn.ConvTranspose2d(width, fine_width, 2, 2)
        self.refine_fine = conv_norm_act(fine_width, fine_width, 3, **layer)
        self.down = nn.Conv2d(fine_width, width, 3, 2, padding=1)
        self.fuse = conv_norm_act(2 * width, width, 3, **layer)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features, rois):
        x = self.blocks(self.reduce(roi_align(features, rois, self.roi_size, 1 / 8)))
        coarse = self.refine_coarse(self.up_coarse(x))
        fine = self.refine_fine(self.up_fine(coarse))
        return self.classifier(self.fuse(torch.cat([coarse, self.down(fine)], 1)))
