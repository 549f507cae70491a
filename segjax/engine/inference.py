"""mmsegmentation's test-time protocol on the host (README "Evaluation protocol"): keep-ratio
resize, the sliding-window crop grid and its averaging, and the test-time-augmentation merge.

Pure numpy around one `forward`: uint8 NHWC crops [B, h, w, 3] -> float32 per-class scores
[B, K, h, w] at the crops' size (a jitted model, segjax.engine.evaluation, or an ONNX session).
Every batch has one shape, padded when short, so a model compiles once per crop size.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from segjax.config import ConfigError, EvalConfig

Forward = Callable[[np.ndarray], np.ndarray]


def images_nchw(images, xp=np):
    """uint8 NHWC images -> float32 NCHW in [0, 1], the exported graphs' input (xp: numpy or jax.numpy)."""
    return xp.moveaxis(xp.asarray(images).astype(xp.float32) / 255.0, -1, 1)


# ---------------------------------------------------------------- config


def uses_protocol(ev: EvalConfig) -> bool:
    """Anything but the defaults: per-image evaluation instead of fixed-size batches."""
    default = EvalConfig()
    return (ev.resize, ev.mode, ev.scales, ev.flip) != (default.resize, default.mode, default.scales, default.flip)


def _pair(ev: EvalConfig, key: str, *, required: bool) -> None:
    value = getattr(ev, key)
    if (value or required) and (len(value) != 2 or min(value) < 1):
        raise ConfigError(f"eval.{key} must be (height, width), each >= 1, got {value}"
                          + (" (eval.mode=slide needs it)" if required and not value else ""))


def check_eval(ev: EvalConfig, eval_size: tuple[int, int] | None = None) -> None:
    """ConfigError, naming the key and its valid range, for an `eval` section that cannot run;
    `eval_size` (the task's, the bound of an empty eval.resize) adds the crop-size check."""
    if ev.mode not in ("whole", "slide"):
        raise ConfigError(f"eval.mode={ev.mode!r} is not valid; choose one of ['whole', 'slide']")
    _pair(ev, "resize", required=False)
    slide = ev.mode == "slide"
    _pair(ev, "crop", required=slide)
    _pair(ev, "stride", required=slide)
    if slide and not all(1 <= s <= c for s, c in zip(ev.stride, ev.crop)):
        raise ConfigError(f"eval.stride must be within [1, eval.crop] = [1, {ev.crop}] per side, got {ev.stride}")
    if not ev.scales or min(ev.scales) <= 0:
        raise ConfigError(f"eval.scales must be factors > 0, got {ev.scales}")
    if ev.batch_size < 1:
        raise ConfigError(f"eval.batch_size must be >= 1, got {ev.batch_size}")
    bound = ev.resize or eval_size
    # Every resized image fits in `bound` (one orientation): a larger crop would only add padding.
    if slide and bound and not (ev.crop[0] <= bound[0] and ev.crop[1] <= bound[1]):
        raise ConfigError(f"eval.crop {ev.crop} must fit in eval.resize {tuple(bound)} (height, width)"
                          + ("" if ev.resize else ", the data's eval size"))
    if bound and int(min(bound) * min(ev.scales)) < 1:
        raise ConfigError(f"eval.scales: {min(ev.scales)} x eval.resize {tuple(bound)} is under one pixel")


@dataclass(frozen=True)
class Protocol:
    """One task's resolved `eval` section."""

    resize: tuple[int, int]  # keep-ratio bound (h, w) at scale 1
    crop: tuple[int, int] | None  # slide window; None = whole image
    stride: tuple[int, int] | None
    scales: tuple[float, ...]
    flip: bool
    batch_size: int  # crops per forward (slide), a multiple of `min_batch`
    min_batch: int  # the whole image's batch: the data devices
    logits: bool  # scores are logits (softmax before merging), else already probabilities
    fixed_size: tuple[int, int] | None = None  # the model's only input size (an ONNX graph)


def build_protocol(ev: EvalConfig, eval_size: tuple[int, int], outputs: str, *, min_batch: int = 1,
                   fixed_size: tuple[int, int] | None = None) -> Protocol:
    """`ev` checked and resolved; `outputs` is "logits" or "probabilities" (the task's `eval_outputs`)."""
    check_eval(ev, eval_size)
    if fixed_size is not None and ev.mode == "slide" and tuple(ev.crop) != tuple(fixed_size):
        raise ConfigError(f"eval.crop {ev.crop} must equal the model's fixed input size {tuple(fixed_size)}")
    slide = ev.mode == "slide"
    return Protocol(resize=tuple(ev.resize or eval_size), crop=tuple(ev.crop) if slide else None,
                    stride=tuple(ev.stride) if slide else None, scales=tuple(ev.scales), flip=ev.flip,
                    batch_size=-(-ev.batch_size // min_batch) * min_batch, min_batch=min_batch,
                    logits=outputs == "logits", fixed_size=fixed_size)


# ---------------------------------------------------------------- geometry


def rescale_size(height: int, width: int, bound: tuple[int, int]) -> tuple[int, int]:
    """mmcv's `rescale_size` (mmseg's Resize(scale, keep_ratio=True)): one factor, the long edge
    <= max(bound) and the short edge <= min(bound), sides rounded as mmcv (int(x + 0.5))."""
    factor = min(max(bound) / max(height, width), min(bound) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def crop_grid(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, ...]]:
    """(y1, y2, x1, x2) of each window in mmseg's `slide_inference` order: rows of windows every
    `stride`, the last row and column moved back to end at the border (clipped to the image when it
    is smaller than the crop)."""
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride_h + crop_h, height), min(j * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def bilinear_axis(count: int, length: int, start: float, stop: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling of `count` pixels spanning source coordinates [start, stop) of an axis of
    `length` pixels (pixel centres, edges clamped, as F.interpolate with align_corners=False):
    (lower index, upper index, upper weight)."""
    centres = np.clip(start + (np.arange(count) + 0.5) * (stop - start) / count - 0.5, 0, length - 1)
    low = np.floor(centres).astype(np.int64)
    return low, np.minimum(low + 1, length - 1), (centres - low).astype(np.float32)


def resample(scores: np.ndarray, rows: tuple, cols: tuple) -> np.ndarray:
    """scores [K, h, w] sampled at `bilinear_axis` rows and columns -> [K, len(rows), len(cols)]."""
    low, high, weight = rows
    x = scores[:, low] * (1 - weight[:, None]) + scores[:, high] * weight[:, None]
    low, high, weight = cols
    return x[..., low] * (1 - weight) + x[..., high] * weight


def resize_scores(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[K, h, w] -> [K, *size] as F.interpolate(mode="bilinear", align_corners=False)."""
    _, height, width = scores.shape
    if (height, width) == tuple(size):
        return scores
    return resample(scores, bilinear_axis(size[0], height, 0.0, height), bilinear_axis(size[1], width, 0.0, width))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> [*size, 3], bilinear without antialiasing, as mmcv's cv2 resize."""
    if image.shape[:2] == tuple(size):
        return image
    out = resize_scores(np.moveaxis(image, -1, 0).astype(np.float32), size)
    return np.moveaxis(np.clip(np.rint(out), 0, 255).astype(np.uint8), 0, -1)


# ---------------------------------------------------------------- inference


def slide(image: np.ndarray, crop: tuple[int, int], stride: tuple[int, int], forward: Forward,
          batch_size: int) -> np.ndarray:
    """Scores [K, H, W] of uint8 `image` [H, W, 3] as mmseg's slide_inference: the image padded
    (bottom, right, zeros) to at least `crop`, each `crop_grid` window's scores added where it lies,
    divided by the number of windows over each pixel; the padding cut off. Crops go to `forward`
    `batch_size` at a time, the last batch padded."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((0, max(crop[0] - height, 0)), (0, max(crop[1] - width, 0)), (0, 0)))
    windows = crop_grid(*padded.shape[:2], crop, stride)
    total, count = None, np.zeros(padded.shape[:2], np.float32)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        crops = np.zeros((batch_size, *crop, 3), np.uint8)
        for i, (y1, y2, x1, x2) in enumerate(chunk):
            crops[i] = padded[y1:y2, x1:x2]
        scores = forward(crops)
        if total is None:
            total = np.zeros((scores.shape[1], *padded.shape[:2]), np.float32)
        for (y1, y2, x1, x2), crop_scores in zip(chunk, scores):
            total[:, y1:y2, x1:x2] += crop_scores
            count[y1:y2, x1:x2] += 1
    return total[:, :height, :width] / count[:height, :width]


def softmax(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis, keepdims=True))
    return shifted / shifted.sum(axis, keepdims=True)


def tta_merge(versions: Iterable[np.ndarray], logits: bool) -> np.ndarray:
    """mmseg's SegTTAModel.merge_preds: the mean over versions [K, H, W] (each at the image's size,
    flips undone) of their class probabilities, softmax over K first when they are logits."""
    total, count = None, 0
    for scores in versions:
        probs = softmax(scores) if logits else scores
        total = probs if total is None else total + probs
        count += 1
    return total / count


def _window(protocol: Protocol, size: tuple[int, int], bound: tuple[int, int]) -> tuple[tuple, tuple, int]:
    """(crop, stride, batch) for a resized image of `size`: the slide window, or for the whole
    image one window over a padded box, the same box for every image of an orientation (or the
    model's fixed size), so that the model compiles once per box."""
    if protocol.crop is not None:
        return protocol.crop, protocol.stride, protocol.batch_size
    box = protocol.fixed_size or ((max(bound), min(bound)) if size[0] >= size[1] else (min(bound), max(bound)))
    if size[0] > box[0] or size[1] > box[1]:
        raise ConfigError(f"eval.resize: a {size[0]}x{size[1]} resized image does not fit the model's fixed input "
                          f"{box[0]}x{box[1]}; lower eval.resize or use eval.mode=slide, eval.crop={box[0]},{box[1]}")
    return tuple(box), tuple(box), protocol.min_batch


def image_scores(image: np.ndarray, protocol: Protocol, forward: Forward) -> np.ndarray:
    """Class probabilities [K, H, W] of uint8 `image` [H, W, 3] at its own size: per scale and flip
    the keep-ratio resized image through `slide` (or whole), bilinearly resized back, flip undone,
    merged by `tta_merge`."""
    height, width = image.shape[:2]

    def versions():
        for scale in protocol.scales:
            bound = (int(protocol.resize[0] * scale), int(protocol.resize[1] * scale))
            resized = resize_image(image, rescale_size(height, width, bound))
            crop, stride, batch = _window(protocol, resized.shape[:2], bound)
            for flip in (False, True) if protocol.flip else (False,):
                scores = slide(resized[:, ::-1] if flip else resized, crop, stride, forward, batch)
                scores = resize_scores(scores, (height, width))
                yield scores[:, :, ::-1] if flip else scores

    return tta_merge(versions(), protocol.logits)


def segment(image: np.ndarray, protocol: Protocol, forward: Forward) -> np.ndarray:
    """The class (argmax of `image_scores`) per pixel of `image`, uint8 [H, W]."""
    return image_scores(image, protocol, forward).argmax(0).astype(np.uint8)
