r"""Hugging Face `Mask2FormerForUniversalSegmentation` directories in and out of
`segjax.models.mask2former.Mask2Former`.

  model, class_names = load_hf_mask2former("path/to/save_pretrained_dir")
  save_hf_mask2former(model, "out_dir", class_names)   # from_pretrained loads it

A directory is HF's `save_pretrained` output: `config.json` plus `model.safetensors` (or a
sharded `model.safetensors.index.json`), or a `pytorch_model.bin` read with
`torch.load(weights_only=True)`. The model's sizes come from `config.json` (any hidden size,
head count, layer counts, queries, classes, Swin or ResNet backbone). Weight names: the on-disk
ones (4.x and 5.x `save_pretrained`) and the 5.x in-memory Swin names (`swin.` level,
`q_proj`…`o_proj`, `mlp.fc1`) are both accepted. Deliberately ignored: Swin's
`relative_position_index` (a constant), its unused final `layernorm`, `criterion.empty_weight`
(the loss's class weights), BatchNorm's `num_batches_tracked`. Everything else must map, as in
`segjax.bridge.torch_import`. The cross-attention's fused `in_proj_weight` / `in_proj_bias`
(torch `nn.MultiheadAttention`) are split into query / key / value on import and fused on export.
"""
import json
import logging
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from segjax.bridge.schemes import Rule, Scheme, batch_norm, conv, layer_norm, linear
from segjax.bridge.torch_import import _to_numpy, import_torch_weights, load_torch_state_dict, to_torch_state_dict
from segjax.models.mask2former import NUM_LEVELS, Mask2Former

log = logging.getLogger("segjax")

ENCODER = "model.pixel_level_module.encoder."
PIXEL = "model.pixel_level_module.decoder."
TRANSFORMER = "model.transformer_module."
FUSED = ("in_proj_weight", "in_proj_bias")
STAGES = 4


def _mha(source: str, names: tuple[str, str, str, str], target: str) -> tuple[Rule, ...]:
    """torch q/k/v/out projections `source.{names}` -> `nnx.MultiHeadAttention` at `target`."""
    rules = []
    for name, part in zip(names[:3], ("query", "key", "value")):
        rules += [Rule(f"{source}.{name}.weight", f"{target}.{part}.kernel", (1, 0), split=1),
                  Rule(f"{source}.{name}.bias", f"{target}.{part}.bias", split=0)]
    return (*rules, Rule(f"{source}.{names[3]}.weight", f"{target}.out.kernel", (1, 0), split=0),
            Rule(f"{source}.{names[3]}.bias", f"{target}.out.bias"))


def _swin(swin: str, block_names: dict[str, str]) -> tuple[Rule, ...]:
    block = f"{ENCODER}{swin}encoder.layers.{{S}}.blocks.{{B}}."
    target = "backbone.stages.{S}.{B}."
    attention = block + block_names["attention"]
    return (
        *conv(f"{ENCODER}{swin}embeddings.patch_embeddings.projection", "backbone.patch_embed",
              bias=True),
        *layer_norm(f"{ENCODER}{swin}embeddings.norm", "backbone.embed_norm"),
        *layer_norm(block + "layernorm_before", target + "layernorm_before"),
        *layer_norm(block + "layernorm_after", target + "layernorm_after"),
        *(rule for ours, theirs in zip(("q_proj", "k_proj", "v_proj", "o_proj"),
                                       block_names["projections"])
          for rule in linear(f"{attention}.{theirs}", f"{target}attention.{ours}")),
        Rule(f"{attention}.{block_names['bias_table']}",
             target + "attention.relative_position_bias_table"),
        *linear(block + block_names["fc1"], target + "fc1"),
        *linear(block + block_names["fc2"], target + "fc2"),
        *linear(f"{ENCODER}{swin}encoder.layers.{{S}}.downsample.reduction",
                "backbone.merges.{S}.reduction", bias=False),
        *layer_norm(f"{ENCODER}{swin}encoder.layers.{{S}}.downsample.norm",
                    "backbone.merges.{S}.norm"),
    )


# On-disk names first: export writes the first rule that matches a path.
SWIN = (
    *_swin("", dict(attention="attention", bias_table="self.relative_position_bias_table",
                    projections=("self.query", "self.key", "self.value", "output.dense"),
                    fc1="intermediate.dense", fc2="output.dense")),
    *_swin("swin.", dict(attention="attention",
                         bias_table="relative_position_bias.relative_position_bias_table",
                         projections=("q_proj", "k_proj", "v_proj", "o_proj"),
                         fc1="mlp.fc1", fc2="mlp.fc2")),
    *(rule for s in range(STAGES) for rule in layer_norm(
        f"{ENCODER}hidden_states_norms.stage{s + 1}", f"backbone.out_norms.{s}")),
)


def _conv_bn(source: str, target: str, bn: str) -> tuple[Rule, ...]:
    return conv(source + ".convolution", target) + batch_norm(source + ".normalization", bn)


# HF ResNetBackbone -> segjax.models.resnet.ResNet (stage s is `layer{s+1}`, conv c is
# `conv{c+1}`; the shortcut is the `downsample` ConvNormAct).
RESNET = (
    *_conv_bn(f"{ENCODER}embedder.embedder", "backbone.conv1", "backbone.bn1"),
    *(rule for s in range(STAGES) for c in range(3) for rule in _conv_bn(
        f"{ENCODER}encoder.stages.{s}.layers.{{L}}.layer.{c}",
        f"backbone.layer{s + 1}.{{L}}.conv{c + 1}", f"backbone.layer{s + 1}.{{L}}.bn{c + 1}")),
    *(rule for s in range(STAGES) for rule in _conv_bn(
        f"{ENCODER}encoder.stages.{s}.layers.{{L}}.shortcut",
        f"backbone.layer{s + 1}.{{L}}.downsample.conv", f"backbone.layer{s + 1}.{{L}}.downsample.norm")),
)

HEADS = (
    # pixel decoder
    Rule(PIXEL + "level_embed", "pixel_decoder.level_embed"),
    *conv(PIXEL + "input_projections.{I}.0", "pixel_decoder.input_projections.{I}.conv", bias=True),
    *layer_norm(PIXEL + "input_projections.{I}.1", "pixel_decoder.input_projections.{I}.norm"),
    *(rule for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
      for rule in linear(f"{PIXEL}encoder.layers.{{I}}.self_attn.{name}",
                         f"pixel_decoder.layers.{{I}}.self_attn.{name}")),
    *(rule for name in ("self_attn_layer_norm", "final_layer_norm") for rule in layer_norm(
        f"{PIXEL}encoder.layers.{{I}}.{name}", f"pixel_decoder.layers.{{I}}.{name}")),
    *(rule for name in ("fc1", "fc2") for rule in linear(
        f"{PIXEL}encoder.layers.{{I}}.{name}", f"pixel_decoder.layers.{{I}}.{name}")),
    *conv(PIXEL + "mask_projection", "pixel_decoder.mask_projection", bias=True),
    *(rule for i in range(NUM_LEVELS) for rule in (
        *conv(f"{PIXEL}adapter_{i + 1}.0", f"pixel_decoder.adapters.{i}.conv"),
        *layer_norm(f"{PIXEL}adapter_{i + 1}.1", f"pixel_decoder.adapters.{i}.norm"),
        *conv(f"{PIXEL}layer_{i + 1}.0", f"pixel_decoder.fpn_layers.{i}.conv"),
        *layer_norm(f"{PIXEL}layer_{i + 1}.1", f"pixel_decoder.fpn_layers.{i}.norm"))),
    # transformer decoder
    *(Rule(f"{TRANSFORMER}{name}.weight", f"transformer.{name}.embedding")
      for name in ("queries_embedder", "queries_features", "level_embed")),
    *conv(TRANSFORMER + "input_projections.{I}", "transformer.input_projections.{I}", bias=True),
    *_mha(TRANSFORMER + "decoder.layers.{I}.self_attn", ("q_proj", "k_proj", "v_proj", "out_proj"),
          "transformer.layers.{I}.self_attn"),
    *_mha(TRANSFORMER + "decoder.layers.{I}.cross_attn", ("q", "k", "v", "out_proj"),
          "transformer.layers.{I}.cross_attn"),
    *(rule for theirs, ours in (("self_attn_layer_norm", "norm1"), ("cross_attn_layer_norm", "norm2"),
                                ("final_layer_norm", "norm3"))
      for rule in layer_norm(f"{TRANSFORMER}decoder.layers.{{I}}.{theirs}",
                             f"transformer.layers.{{I}}.{ours}")),
    *linear(TRANSFORMER + "decoder.layers.{I}.fc1", "transformer.layers.{I}.linear1"),
    *linear(TRANSFORMER + "decoder.layers.{I}.fc2", "transformer.layers.{I}.linear2"),
    *layer_norm(TRANSFORMER + "decoder.layernorm", "transformer.layernorm"),
    *linear(TRANSFORMER + "decoder.mask_predictor.mask_embedder.{I}.0",
            "transformer.mask_embedder.layers.{I}"),
    *linear("class_predictor", "transformer.class_predictor"),
)

IGNORED = (r".*\.relative_position_index", re.escape(ENCODER) + r"(swin\.)?layernorm\..*",
           r"criterion\.empty_weight", r".*num_batches_tracked")
SCHEMES = {"swin": Scheme(SWIN + HEADS, ignored=IGNORED),
           "resnet": Scheme(RESNET + HEADS, ignored=IGNORED)}
CLASS_HEAD = r"transformer\.class_predictor\..*"

# HF backbone settings segjax's Swin / ResNet implement (anything else is refused).
_SWIN_FIXED = dict(num_channels=3, qkv_bias=True, hidden_act="gelu", use_absolute_embeddings=False,
                   layer_norm_eps=1e-5)
_RESNET_FIXED = dict(num_channels=3, hidden_act="relu", downsample_in_first_stage=False,
                     downsample_in_bottleneck=False)
_MODEL_FIXED = dict(activation_function="relu", pre_norm=False, feature_strides=[4, 8, 16, 32])
_MODEL_KEYS = ("feature_size", "mask_feature_size", "hidden_dim", "num_queries", "encoder_layers",
               "encoder_feedforward_dim", "decoder_layers", "dim_feedforward", "common_stride",
               "enforce_input_projection")


def model_kwargs(config: dict) -> tuple[int, dict, list[str]]:
    """(num_classes, Mask2Former keyword arguments, class names) from an HF config.json dict.

    Raises ValueError naming every setting segjax does not implement.
    """
    backbone = dict(config.get("backbone_config") or {})
    kind = backbone.get("model_type")
    problems = []

    def check(settings, fixed, where):
        for key, value in fixed.items():
            found = settings.get(key, value)
            if (list(found) if isinstance(found, (list, tuple)) else found) != value:
                problems.append(f"{where}{key}={found!r} (segjax implements {value!r})")

    check(config, _MODEL_FIXED, "")
    if config.get("use_timm_backbone") or config.get("backbone"):
        problems.append("a named/timm backbone (segjax builds backbone_config's Swin or ResNet)")
    out_features = backbone.get("out_features", [f"stage{i + 1}" for i in range(STAGES)])
    if list(out_features) != [f"stage{i + 1}" for i in range(STAGES)]:
        problems.append(f"backbone out_features={out_features!r} (segjax uses stage1..stage4)")
    if kind == "swin":
        check(backbone, _SWIN_FIXED, "backbone_config.")
        depths = backbone.get("depths", [2, 2, 6, 2])
        if len(depths) != STAGES:
            problems.append(f"backbone_config.depths={depths!r} (4 stages needed)")
        backbone_kwargs = dict(
            embed_dim=backbone.get("embed_dim", 96), depths=tuple(depths),
            num_heads=tuple(backbone.get("num_heads", [3, 6, 12, 24])),
            window_size=backbone.get("window_size", 7), patch_size=backbone.get("patch_size", 4),
            mlp_ratio=backbone.get("mlp_ratio", 4.0),
            drop_path_rate=backbone.get("drop_path_rate", 0.1))
        if backbone_kwargs["patch_size"] != 4:
            problems.append(f"backbone_config.patch_size={backbone_kwargs['patch_size']} "
                            "(strides 4..32 need 4)")
    elif kind == "resnet":
        check(backbone, _RESNET_FIXED, "backbone_config.")
        width = backbone.get("embedding_size", 64)
        layer_type = backbone.get("layer_type", "bottleneck")
        expansion = 4 if layer_type == "bottleneck" else 1
        sizes = list(backbone.get("hidden_sizes", [256, 512, 1024, 2048]))
        if sizes != [width * 2**i * expansion for i in range(STAGES)]:
            problems.append(f"backbone_config.hidden_sizes={sizes} with embedding_size={width} "
                            f"(segjax's ResNet has {expansion}·{width}·2^i)")
        backbone_kwargs = dict(layer_type=layer_type, depths=tuple(backbone.get("depths", [3, 4, 6, 3])),
                               width=width)
    else:
        problems.append(f"backbone_config.model_type={kind!r} (segjax builds 'swin' or 'resnet')")
    if problems:
        raise ValueError("unsupported Mask2Former config: " + "; ".join(problems))
    id2label = config.get("id2label") or {}
    num_classes = len(id2label) if id2label else int(config.get("num_labels", 2))
    names = [id2label.get(str(i), id2label.get(i, f"LABEL_{i}")) for i in range(num_classes)]
    kwargs = dict(backbone=kind, backbone_config=backbone_kwargs,
                  num_heads=config.get("num_attention_heads", 8),
                  dropout_rate=float(config.get("dropout", 0.0)),
                  **{k: config[k] for k in _MODEL_KEYS if k in config})
    return num_classes, kwargs, names


def hf_config(num_classes: int, kwargs: dict, class_names=None) -> dict:
    """The config.json dict of a Mask2Former built with `kwargs` (inverse of `model_kwargs`)."""
    names = list(class_names) if class_names is not None else [f"LABEL_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    backbone = dict(kwargs.get("backbone_config") or {})
    stages = [f"stage{i + 1}" for i in range(STAGES)]
    if kwargs.get("backbone", "swin") == "swin":
        backbone_config = dict(model_type="swin", out_features=stages, **_SWIN_FIXED,
                               **{k: list(v) if isinstance(v, tuple) else v
                                  for k, v in backbone.items()})
    else:
        expansion = 4 if backbone.get("layer_type", "bottleneck") == "bottleneck" else 1
        width = backbone.get("width", 64)
        backbone_config = dict(
            model_type="resnet", out_features=stages, **_RESNET_FIXED,
            layer_type=backbone.get("layer_type", "bottleneck"), embedding_size=width,
            depths=list(backbone["depths"]),
            hidden_sizes=[width * 2**i * expansion for i in range(STAGES)])
    return dict(
        model_type="mask2former", architectures=["Mask2FormerForUniversalSegmentation"],
        backbone_config=backbone_config, **_MODEL_FIXED,
        num_attention_heads=kwargs.get("num_heads", 8), dropout=kwargs.get("dropout_rate", 0.0),
        **{k: kwargs[k] for k in _MODEL_KEYS if k in kwargs},
        id2label={str(i): name for i, name in enumerate(names)},
        label2id={name: i for i, name in enumerate(names)})


def read_hf_dir(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, state dict) of a `save_pretrained` directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: no config.json")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "mask2former":
        raise ValueError(f"{path}/config.json is a {config.get('model_type')!r} model, "
                         "not 'mask2former'")
    if (path / "model.safetensors").is_file():
        return config, load_torch_state_dict(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():
        shards = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())
                            ["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_torch_state_dict(path / shard))
        return config, state
    if (path / "pytorch_model.bin").is_file():
        return config, load_torch_state_dict(path / "pytorch_model.bin")  # weights_only=True
    raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json "
                            "or pytorch_model.bin")


def _split_fused(state_dict: dict) -> dict:
    """The cross-attention's fused in_proj_{weight,bias} as three q/k/v projections."""
    out = {}
    for key, value in state_dict.items():
        stem, _, name = key.rpartition(".")
        if name in FUSED and ".cross_attn" in stem:
            kind = name.removeprefix("in_proj_")
            for part, array in zip("qkv", np.split(_to_numpy(value), 3, axis=0)):
                out[f"{stem}.{part}.{kind}"] = array
        else:
            out[key] = value
    return out


def _fuse(state_dict: dict) -> dict:
    """Inverse of `_split_fused`."""
    out, parts = {}, {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(.*\.cross_attn)\.([qkv])\.(weight|bias)", key)
        if match:
            parts.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            out[key] = value
    for (stem, kind), qkv in parts.items():
        out[f"{stem}.in_proj_{kind}"] = np.concatenate([qkv[p] for p in "qkv"], axis=0)
    return out


def import_hf_state_dict(model: Mask2Former, state_dict: dict, *,
                         reinit_class_head: bool = False) -> Mask2Former:
    """Fill `model` in place from an HF state dict (either naming); all or nothing."""
    scheme = SCHEMES["swin" if hasattr(model.backbone, "stages") else "resnet"]
    return import_torch_weights(model, _split_fused(state_dict), scheme,
                                keep=(CLASS_HEAD,) if reinit_class_head else ())


def load_hf_mask2former(path: str | Path, *, num_classes: int | None = None,
                        dtype=jnp.float32, param_dtype=jnp.float32, msda_method=None,
                        rngs: nnx.Rngs | None = None) -> tuple[Mask2Former, list[str]]:
    """(model, class names) from a `save_pretrained` directory.

    `num_classes` other than the checkpoint's keeps a freshly initialised class head (HF's
    `ignore_mismatched_sizes`), logged; its class names are then LABEL_i.
    """
    config, state_dict = read_hf_dir(path)
    classes, kwargs, names = model_kwargs(config)
    reinit = num_classes is not None and num_classes != classes
    if reinit:
        log.warning("%s has %d classes, the model %d: the class head is re-initialised",
                    path, classes, num_classes)
        classes, names = num_classes, [f"LABEL_{i}" for i in range(num_classes)]
    model = Mask2Former(classes, **kwargs, msda_method=msda_method, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs or nnx.Rngs(0))
    return import_hf_state_dict(model, state_dict, reinit_class_head=reinit), names


def hf_state_dict(model: Mask2Former, no_object_weight: float = 0.1) -> dict[str, np.ndarray]:
    """{HF on-disk key: array} of `model`, as `save_pretrained` writes it, including the two
    entries segjax has no use for: the loss's class weights `criterion.empty_weight` (1, and
    `no_object_weight` for "no object"), Swin's unused final LayerNorm (identity) and
    BatchNorm's `num_batches_tracked` (0)."""
    swin = hasattr(model.backbone, "stages")
    state = _fuse(to_torch_state_dict(model, SCHEMES["swin" if swin else "resnet"]))
    num_outputs = model.transformer.class_predictor.bias.shape[0]
    state["criterion.empty_weight"] = np.r_[np.ones(num_outputs - 1), no_object_weight]
    for key in [k for k in state if k.endswith(".running_mean")]:
        state[key.removesuffix("running_mean") + "num_batches_tracked"] = np.array(0, np.int64)
    if swin:
        channels = model.backbone.out_channels[-1]
        state[ENCODER + "swin.layernorm.weight"] = np.ones(channels)
        state[ENCODER + "swin.layernorm.bias"] = np.zeros(channels)
    return state


def save_hf_mask2former(model: Mask2Former, path: str | Path, class_names=None, *,
                        config: dict | None = None) -> Path:
    """Write `model` as a transformers directory that `from_pretrained` loads without missing or
    unexpected keys: `config.json` (`config`, e.g. the imported one, else built from the
    model's arguments and `class_names`) and `model.safetensors` in float32."""
    from safetensors.numpy import save_file
    if config is None:
        config = hf_config(model.num_classes, model.arguments, class_names)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = hf_state_dict(model, config.get("no_object_weight", 0.1))
    state = {k: np.array(v, np.float32 if v.dtype.kind == "f" else v.dtype, order="C")
             for k, v in weights.items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
