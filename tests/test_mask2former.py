"""Mask2Former against Hugging Face transformers (5.23, CPU, built offline from configs):
eval-mode class and mask logits of random-initialised tiny models with Swin and ResNet
backbones, the weight bridge both ways (both Swin namings, a new class count, bad input),
the ONNX export (transformers weights -> segjax -> ONNX -> onnxruntime against transformers'
own outputs, and the semantic post-processing), full-size parameter counts, and the
deformable attention's two forms against HF's grid_sample version, values and gradients."""
import dataclasses
import json
import logging
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segjax.bridge.hf_mask2former import (
    hf_config,
    hf_state_dict,
    import_hf_state_dict,
    load_hf_mask2former,
    model_kwargs,
    save_hf_mask2former,
)
from segjax.export.onnx import convert, export
from segjax.models.layers import imagenet_normalize
from segjax.models.mask2former import (
    EXPORT_OUTPUTS,
    MASK2FORMER_VARIANTS,
    Mask2Former,
    export_forward,
    semantic_int64,
    semantic_segmentation,
)
from segjax.ops.ms_deform_attn import METHODS, ms_deform_attn

TOLERANCE = 1e-4  # of the largest activation
TINY = dict(num_labels=3, feature_size=32, mask_feature_size=32, hidden_dim=32, num_queries=8,
            num_attention_heads=2, encoder_layers=2, encoder_feedforward_dim=64, decoder_layers=4,
            dim_feedforward=64)
SIZE = (64, 96)  # stride-4 map 16×24: padded to the 7-window, shifted windows, odd merges


@pytest.fixture(scope="module")
def hf():
    """transformers on the CPU-only torch (torchvision's compiled ops stubbed, see STACK_NOTES)."""
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import torch
    import transformers
    return types.SimpleNamespace(torch=torch, t=transformers)


def _backbone_config(hf, kind):
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if kind == "swin":
        return hf.t.SwinConfig(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                               window_size=7, out_features=stages)
    return hf.t.ResNetConfig(embedding_size=8, hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 1, 1],
                             layer_type="bottleneck", out_features=stages)


def _randomised(hf, kind):
    """A tiny HF model with every parameter and BatchNorm statistic random (HF's zero inits
    would hide swapped or dropped weights), in eval mode."""
    torch = hf.torch
    torch.manual_seed(0)
    config = hf.t.Mask2FormerConfig(backbone_config=_backbone_config(hf, kind), **TINY)
    net = hf.t.Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.2
            p.copy_(torch.randn_like(p) * scale)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.add_(1.0)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module", params=["swin", "resnet"])
def pair(request, hf, tmp_path_factory):
    """(HF model, its save_pretrained dir, segjax model imported from it, images, HF outputs)."""
    net = _randomised(hf, request.param)
    path = tmp_path_factory.mktemp(request.param)
    net.save_pretrained(path)
    model, names = load_hf_mask2former(path)
    assert names == ["LABEL_0", "LABEL_1", "LABEL_2"]
    model.eval()
    images = np.random.default_rng(1).uniform(size=(2, *SIZE, 3)).astype(np.float32)
    pixels = hf.torch.from_numpy(np.asarray(imagenet_normalize(images)).transpose(0, 3, 1, 2).copy())
    with hf.torch.no_grad():
        expected = net(pixel_values=pixels, output_auxiliary_logits=True)
    return types.SimpleNamespace(kind=request.param, net=net, path=path, model=model,
                                 images=images, expected=expected)


def _assert_close(ours, theirs):
    theirs = theirs.detach().numpy()
    assert ours.shape == theirs.shape
    diff = float(np.abs(np.asarray(ours, np.float32) - theirs).max())
    scale = max(1.0, float(np.abs(theirs).max()))
    assert diff <= TOLERANCE * scale, f"max difference {diff:.3g} at magnitude {scale:.3g}"


def _weights(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(v)
            for p, v in jax.tree.leaves_with_path(state)}


# ------------------------------------------------------------------ outputs against transformers

def test_outputs_match_transformers(pair):
    """Final and all 9 (here 3) auxiliary class and mask logits, eval mode."""
    out = jax.jit(lambda m, x: m(x))(pair.model, jnp.asarray(pair.images))
    _assert_close(out["class_queries_logits"], pair.expected.class_queries_logits)
    _assert_close(out["masks_queries_logits"], pair.expected.masks_queries_logits)
    assert out["masks_queries_logits"].shape[2:] == (SIZE[0] // 4, SIZE[1] // 4)
    aux = pair.expected.auxiliary_logits
    assert len(out["auxiliary_logits"]) == len(aux) == TINY["decoder_layers"] - 1
    for ours, theirs in zip(out["auxiliary_logits"], aux, strict=True):
        for key in ("class_queries_logits", "masks_queries_logits"):
            _assert_close(ours[key], theirs[key])


def test_bfloat16_compute_stays_close(pair):
    """bf16 compute with f32 parameters: same weights, logits within bf16 rounding."""
    config, _ = json.loads((pair.path / "config.json").read_text()), None
    num_classes, kwargs, _ = model_kwargs(config)
    model = Mask2Former(num_classes, **kwargs, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(pair.model, nnx.Any(nnx.Param, nnx.BatchStat)))
    model.eval()
    assert all(v.dtype == jnp.float32 for v in _weights(model).values())
    out = jax.jit(lambda m, x: m(x))(model, jnp.asarray(pair.images))
    assert out["masks_queries_logits"].dtype == jnp.bfloat16
    expected = pair.expected.class_queries_logits.numpy()
    diff = np.abs(np.asarray(out["class_queries_logits"], np.float32) - expected).max()
    assert diff < 0.1 * max(1.0, np.abs(expected).max())


# ------------------------------------------------------------------------------ the weight bridge

def test_round_trip_through_transformers(pair, hf, tmp_path):
    """segjax -> transformers dir: from_pretrained loads it with no missing or unexpected key,
    bitwise equal to the weights it came from; and back into segjax bitwise."""
    save_hf_mask2former(pair.model, tmp_path)  # config.json from the model's own arguments
    net, info = hf.t.Mask2FormerForUniversalSegmentation.from_pretrained(
        tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    theirs, original = net.state_dict(), pair.net.state_dict()
    for key, value in original.items():
        if "num_batches_tracked" not in key and "swin.layernorm" not in key:
            np.testing.assert_array_equal(theirs[key].numpy(), value.numpy(), err_msg=key)
    again, _ = load_hf_mask2former(tmp_path)
    ours, back = _weights(pair.model), _weights(again)
    assert ours.keys() == back.keys()
    for path in ours:
        np.testing.assert_array_equal(ours[path], back[path], err_msg=path)


def test_in_memory_names_import(pair):
    """transformers 5.x's in-memory state dict (Swin's `swin.`, q_proj, mlp.fc1 names) imports
    to the same weights as the on-disk names."""
    model = nnx.clone(pair.model)
    nnx.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    import_hf_state_dict(model, pair.net.state_dict())
    ours, theirs = _weights(pair.model), _weights(model)
    for path in ours:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)
    if pair.kind == "swin":
        assert any(".swin.encoder." in k for k in pair.net.state_dict())


def test_new_class_count_reinitialises_the_head(pair, caplog):
    with caplog.at_level(logging.WARNING, logger="segjax"):
        model, names = load_hf_mask2former(pair.path, num_classes=5)
    assert "re-initialised" in caplog.text and len(names) == 5
    assert model.transformer.class_predictor.kernel.shape == (TINY["hidden_dim"], 6)
    ours, theirs = _weights(model), _weights(pair.model)
    for path in ours:
        if "class_predictor" not in path:
            np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)


def test_bad_weights_and_configs_are_clear_errors(pair, tmp_path):
    state = hf_state_dict(pair.model)
    state["model.extra.weight"] = np.zeros(3, np.float32)
    del state["model.transformer_module.decoder.layernorm.weight"]
    model = nnx.clone(pair.model)
    with pytest.raises(ValueError, match="match no rule") as err:
        import_hf_state_dict(model, state)
    assert "model.extra.weight" in str(err.value)
    assert "transformer.layernorm.scale" in str(err.value)  # the unfilled target, same message
    config = json.loads((pair.path / "config.json").read_text())
    with pytest.raises(ValueError, match="pre_norm=True"):
        model_kwargs({**config, "pre_norm": True})
    with pytest.raises(ValueError, match="model_type='vit'"):
        model_kwargs({**config, "backbone_config": {"model_type": "vit"}})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_mask2former(tmp_path)


def test_pytorch_bin_directory(hf, tmp_path):
    """A `pytorch_model.bin` directory (read with weights_only=True) and a config written by
    `hf_config` from segjax's own arguments."""
    kwargs = {k: v for k, v in MASK2FORMER_VARIANTS["tiny"].items()}
    model = Mask2Former(2, **kwargs, rngs=nnx.Rngs(3))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(2, kwargs, ["road", "car"])))
    hf.torch.save({k: hf.torch.from_numpy(v) for k, v in hf_state_dict(model).items()},
                  tmp_path / "pytorch_model.bin")
    loaded, names = load_hf_mask2former(tmp_path)
    assert names == ["road", "car"]
    ours, theirs = _weights(model), _weights(loaded)
    for path in ours:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)
    net = hf.t.Mask2FormerForUniversalSegmentation(hf.t.Mask2FormerConfig.from_pretrained(tmp_path))
    assert sum(p.numel() for p in net.parameters()) == _count(model) + _SWIN_UNUSED(16 * 8)


# ---------------------------------------------------------------------------------- ONNX export

@dataclasses.dataclass(frozen=True)
class _ExportConfig:
    experiment: str = "test_mask2former"
    task: str = "query_masks"


class _ExportTask:
    """What `segjax.export.onnx.export` asks of a task, for a bare Mask2Former (the roadways
    task supplies the same from its config)."""

    def __init__(self, size, class_names):
        self.cfg = _ExportConfig()
        self.class_names, self.size = class_names, size

    def export_signature(self, variant="default"):
        return [("images", ("B", 3, *self.size))], list(EXPORT_OUTPUTS[variant])

    def export_forward(self, model, images, variant="default"):
        return export_forward(model, images, variant=variant)


def test_onnx_export_matches_transformers(pair, tmp_path):
    """transformers weights -> segjax -> ONNX (dynamic batch; the exporter's own JAX check at
    batch 1 and 2) -> onnxruntime equals transformers' PyTorch logits on the same images."""
    if pair.kind != "swin":
        pytest.skip("one backbone suffices for the export; both are compared in JAX above")
    from segjax.export.runtime import make_session
    report = export(_ExportTask(SIZE, ["a", "b", "c"]), pair.model, tmp_path / "m.onnx")
    assert report["passed"] and report["metadata"]["inputs"]["images"] == ["B", 3, *SIZE]
    session = make_session(tmp_path / "m.onnx", prefer=("cpu",))
    names = list(EXPORT_OUTPUTS["default"])
    outputs = session.run(names, {"images": pair.images.transpose(0, 3, 1, 2).copy()})
    for name, ours in zip(names, outputs, strict=True):
        _assert_close(ours, getattr(pair.expected, name))


def test_semantic_postprocessing_matches_transformers(pair, hf):
    """`semantic_segmentation` equals the image processor's post_process_semantic_segmentation
    (384×384 intermediate), and its int64 form exports (dynamic batch) to the same maps."""
    if pair.kind != "swin":
        pytest.skip("the post-processing does not depend on the backbone")
    processor = hf.t.Mask2FormerImageProcessor()
    size = (50, 70)  # any target size
    expected = np.stack([m.numpy() for m in processor.post_process_semantic_segmentation(
        pair.expected, target_sizes=[size] * len(pair.images))])
    class_logits = pair.expected.class_queries_logits.numpy()
    mask_logits = pair.expected.masks_queries_logits.numpy()
    ours = np.asarray(semantic_segmentation(class_logits, mask_logits, size))
    np.testing.assert_array_equal(ours, expected)
    proto = convert(lambda c, m: (semantic_int64(c, m, size),),
                     [("class_queries_logits", ("B", *class_logits.shape[1:])),
                      ("masks_queries_logits", ("B", *mask_logits.shape[1:]))], ["segmentation"], 23)
    import onnxruntime
    session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        (maps,) = session.run(None, {"class_queries_logits": class_logits[:batch],
                                     "masks_queries_logits": mask_logits[:batch]})
        assert maps.dtype == np.int64
        np.testing.assert_array_equal(maps, expected[:batch])


# --------------------------------------------------------------------------- full-size counts

def _count(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _SWIN_UNUSED(channels):  # noqa: N802 - HF's SwinModel keeps a final LayerNorm it never uses
    return 2 * channels


@pytest.mark.parametrize("variant", ["swin_tiny", "resnet50", "swin_small", "swin_base", "swin_large"])
def test_full_size_parameter_counts(hf, variant):
    """jax.eval_shape counts equal transformers' (built on the meta device), 19 classes.

    Swin-S/B/L at their widths, heads and windows but two blocks per stage: nnx.eval_shape's
    cost grows quadratically with the number of modules (30 s for Swin-L); the extra blocks
    are copies of the counted ones.
    """
    kwargs = MASK2FORMER_VARIANTS[variant]
    if variant in ("swin_small", "swin_base", "swin_large"):
        kwargs = {**kwargs, "backbone_config": {**kwargs["backbone_config"], "depths": (2, 2, 2, 2)}}
    model = nnx.eval_shape(lambda: Mask2Former(19, **kwargs, rngs=nnx.Rngs(0)))
    config = hf.t.Mask2FormerConfig.from_dict(hf_config(19, kwargs))
    with hf.torch.device("meta"):
        net = hf.t.Mask2FormerForUniversalSegmentation(config)
    theirs = sum(p.numel() for p in net.parameters())
    unused = _SWIN_UNUSED(model.backbone.out_channels[-1]) if kwargs["backbone"] == "swin" else 0
    assert _count(model) + unused == theirs
    if variant == "swin_tiny":
        assert round(theirs / 1e6, 2) == 47.41
        assert _count(model.transformer) == 14_463_764  # what frozen fine-tuning trains


# ------------------------------------------------------------------- multi-scale deformable attention

@pytest.fixture(scope="module")
def msda_case():
    rng = np.random.default_rng(0)
    shapes = [(5, 7), (3, 4), (2, 2)]
    total = sum(h * w for h, w in shapes)
    value = rng.normal(size=(2, total, 2, 4)).astype(np.float32)
    # Locations partly outside [0, 1]: corners off the map contribute zero.
    locations = rng.uniform(-0.2, 1.2, size=(2, 9, 2, 3, 4, 2)).astype(np.float32)
    weights = rng.uniform(size=(2, 9, 2, 3, 4)).astype(np.float32)
    cotangent = rng.normal(size=(2, 9, 8)).astype(np.float32)
    return shapes, value, locations, weights, cotangent


@pytest.mark.parametrize("method", METHODS)
def test_ms_deform_attn_matches_grid_sample(hf, msda_case, method):
    """Values and gradients (values, locations, weights) against HF's PyTorch version."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention
    shapes, value, locations, weights, cotangent = msda_case
    torch_inputs = [hf.torch.tensor(a, requires_grad=True) for a in (value, locations, weights)]
    expected = multi_scale_deformable_attention(torch_inputs[0], shapes, *torch_inputs[1:])
    expected.backward(hf.torch.from_numpy(cotangent))

    def f(v, loc, w):
        return ms_deform_attn(v, shapes, loc, w, method=method)

    out, vjp = jax.vjp(f, value, locations, weights)
    np.testing.assert_allclose(out, expected.detach().numpy(), atol=1e-5)
    for ours, theirs in zip(vjp(jnp.asarray(cotangent)), torch_inputs, strict=True):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), atol=1e-4)


def test_ms_deform_attn_rejects_bad_shapes(msda_case):
    shapes, value, locations, weights, _ = msda_case
    with pytest.raises(ValueError, match="do not fit"):
        ms_deform_attn(value, shapes[:2], locations, weights)
    with pytest.raises(ValueError, match="unknown method"):
        ms_deform_attn(value, shapes, locations, weights, method="cuda")
