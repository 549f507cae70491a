r"""Name tables between PyTorch state dicts and segjax models, one scheme per PyTorch original.

A rule pairs a PyTorch key template with a segjax state-path template (dotted, list indices as
numbers) and the axis permutation that turns the PyTorch array into the segjax one; `split`
names the axis (after the permutation) that the segjax array splits in two (a projection's
heads × head size in `nnx.MultiHeadAttention`). `{name}` in
a template stands for an index (`\d+`), `{name:regex}` for a constrained one; the same names
appear on both sides, so one table maps in both directions (import and export).
"""
import dataclasses
import functools
import re

# torch Conv2d weight [out, in, kh, kw] -> nnx.Conv kernel [kh, kw, in, out].
CONV = (2, 3, 1, 0)

_PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]+))?\}")
_INDEX = r"\d+"


@functools.cache
def _pattern(template: str) -> re.Pattern:
    parts, end = [], 0
    for match in _PLACEHOLDER.finditer(template):
        parts += [re.escape(template[end:match.start()]),
                  f"(?P<{match[1]}>{match[2] or _INDEX})"]
        end = match.end()
    parts.append(re.escape(template[end:]))
    return re.compile("".join(parts))


def _translate(key: str, from_template: str, to_template: str) -> str | None:
    match = _pattern(from_template).fullmatch(key)
    if match is None:
        return None
    return _PLACEHOLDER.sub(lambda m: match[m[1]], to_template)


@dataclasses.dataclass(frozen=True)
class Rule:
    """`source` (PyTorch key) <-> `target` (segjax path); `layout` permutes source axes, then
    axis `split` becomes the target's two axes split and split + 1."""

    source: str
    target: str
    layout: tuple[int, ...] | None = None
    split: int | None = None

    def target_of(self, key: str) -> str | None:
        return _translate(key, self.source, self.target)

    def source_of(self, path: str) -> str | None:
        return _translate(path, self.target, self.source)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """Rules tried in order (first match wins), and regexes of PyTorch keys that are known to
    have no segjax counterpart and are skipped on import."""

    rules: tuple[Rule, ...]
    ignored: tuple[str, ...] = ()
    classifier: str = ""  # the PyTorch key whose first axis is the class count, for whole models

    def num_classes(self, state_dict) -> int | None:
        """The class count a state dict's classifier was trained for (None: no classifier)."""
        weight = state_dict.get(self.classifier) if self.classifier else None
        return None if weight is None else int(weight.shape[0])

    def target_of(self, key: str) -> tuple[str, Rule] | None:
        return next(((path, rule) for rule in self.rules
                     if (path := rule.target_of(key)) is not None), None)

    def source_of(self, path: str) -> tuple[str, Rule] | None:
        return next(((key, rule) for rule in self.rules
                     if (key := rule.source_of(path)) is not None), None)

    def is_ignored(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.ignored)


def conv(source: str, target: str, *, bias: bool = False) -> tuple[Rule, ...]:
    """torch `Conv2d` -> `nnx.Conv`."""
    rules = (Rule(source + ".weight", target + ".kernel", CONV),)
    return rules + (Rule(source + ".bias", target + ".bias"),) if bias else rules


def batch_norm(source: str, target: str) -> tuple[Rule, ...]:
    """torch `BatchNorm2d` -> `nnx.BatchNorm` (num_batches_tracked has no counterpart)."""
    names = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
             ("running_var", "var"))
    return tuple(Rule(f"{source}.{s}", f"{target}.{t}") for s, t in names)


def conv_norm(source_conv: str, source_norm: str, target: str) -> tuple[Rule, ...]:
    """A torch conv + BatchNorm pair -> `layers.ConvNormAct` (its `.conv` and `.norm`)."""
    return conv(source_conv, target + ".conv") + batch_norm(source_norm, target + ".norm")


def prefixed(rules: tuple[Rule, ...], prefix: str) -> tuple[Rule, ...]:
    """The same rules for a submodule named `prefix` on both sides ("backbone.", "encoder.")."""
    return tuple(Rule(prefix + r.source, prefix + r.target, r.layout, r.split) for r in rules)


def linear(source: str, target: str, *, bias: bool = True) -> tuple[Rule, ...]:
    """torch `Linear` [out, in] -> `nnx.Linear` kernel [in, out]."""
    rules = (Rule(source + ".weight", target + ".kernel", (1, 0)),)
    return rules + (Rule(source + ".bias", target + ".bias"),) if bias else rules


def layer_norm(source: str, target: str) -> tuple[Rule, ...]:
    """torch `LayerNorm` / `GroupNorm` -> `nnx.LayerNorm` / `nnx.GroupNorm`."""
    return (Rule(source + ".weight", target + ".scale"), Rule(source + ".bias", target + ".bias"))


NUM_BATCHES_TRACKED = r".*num_batches_tracked"  # a training counter; nnx.BatchNorm keeps none

# torchvision ResNet-18/34/50 (segjax.models.resnet; bn3/conv3 only exist in Bottlenecks).
RESNET = (
    *conv("conv1", "conv1"),
    *batch_norm("bn1", "bn1"),
    *conv("layer{L}.{B}.conv{C}", "layer{L}.{B}.conv{C}"),
    *batch_norm("layer{L}.{B}.bn{C}", "layer{L}.{B}.bn{C}"),
    *conv_norm("layer{L}.{B}.downsample.0", "layer{L}.{B}.downsample.1",
               "layer{L}.{B}.downsample"),
)

# torchvision DeepLabHead: classifier.0 is the ASPP; its branch 4 is the image pooling, whose
# Sequential starts with the (parameter-free) pooling, hence the shifted indices.
DEEPLAB_HEAD = (
    *conv_norm("classifier.0.convs.{R:[0-3]}.0", "classifier.0.convs.{R:[0-3]}.1",
               "classifier.aspp.convs.{R:[0-3]}"),
    *conv_norm("classifier.0.convs.4.1", "classifier.0.convs.4.2",
               "classifier.aspp.convs.4.conv"),
    *conv_norm("classifier.0.project.0", "classifier.0.project.1", "classifier.aspp.project"),
    *conv_norm("classifier.1", "classifier.2", "classifier.conv"),
    *conv("classifier.4", "classifier.out", bias=True),
)

# smp 0.6 UnetDecoder (Conv2dReLU = Sequential(conv, bn, relu)) and segmentation head.
UNET_DECODER = (
    *conv_norm("decoder.blocks.{I}.conv{C}.0", "decoder.blocks.{I}.conv{C}.1",
               "decoder.blocks.{I}.conv{C}"),
    *conv("segmentation_head.0", "segmentation_head", bias=True),
)

# timm darknet53 (segjax.models.darknet): ConvNormAct's `conv`/`bn` -> `conv`/`norm`.
DARKNET = (
    *conv_norm("stem.conv1.conv", "stem.conv1.bn", "stem"),
    *conv_norm("stages.{S}.conv_down.conv", "stages.{S}.conv_down.bn", "stages.{S}.conv_down"),
    *conv_norm("stages.{S}.blocks.{B}.conv{C}.conv", "stages.{S}.blocks.{B}.conv{C}.bn",
               "stages.{S}.blocks.{B}.conv{C}"),
)

SCHEMES = {
    # Any segjax ResNet (standalone, or an encoder passed as `model.encoder`); the ImageNet
    # classifier `fc` is not part of the encoder.
    "torchvision_resnet": Scheme(RESNET, ignored=(NUM_BATCHES_TRACKED, r"fc\..*")),
    # deeplabv3_resnet50; the COCO checkpoints' auxiliary FCN head is not built here.
    "torchvision_deeplabv3": Scheme(
        prefixed(RESNET, "backbone.") + DEEPLAB_HEAD,
        ignored=(NUM_BATCHES_TRACKED, r"aux_classifier\..*"), classifier="classifier.4.weight"),
    "smp_unet": Scheme(prefixed(RESNET, "encoder.") + UNET_DECODER, ignored=(NUM_BATCHES_TRACKED,),
                       classifier="segmentation_head.0.weight"),
    # DarkNet (standalone, or HybridQueryModel's `model.backbone`); timm's classifier is not built.
    "timm_darknet53": Scheme(DARKNET, ignored=(NUM_BATCHES_TRACKED, r"head\.fc\..*")),
}
