"""PyTorch weight import (segjax.bridge) against the real, randomly initialised PyTorch models.

Per scheme: eval-mode outputs equal PyTorch's (NHWC against NCHW) within TOLERANCE, the export
loads with `load_state_dict(strict=True)` and segjax -> torch -> segjax is bitwise. Then the
failure messages and the checkpoint reader. torch, torchvision, timm and smp come from
requirements-torch-ref.txt; nothing is downloaded.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segjax.bridge import import_torch_weights, load_torch_state_dict, to_torch_state_dict
from segjax.models.darknet import DarkNet53
from segjax.models.deeplabv3 import DeepLabV3
from segjax.models.encoder_decoder import EncoderDecoder
from segjax.models.hybrid import SIZES, HybridQueryModel
from segjax.models.layers import imagenet_normalize
from segjax.models.resnet import RESNETS
from segjax.models.unet import Unet

TOLERANCE = 1e-4
NUM_CLASSES = 21


def _images(n, h, w, seed):
    """Random RGB images in [0, 1], NHWC float32."""
    return np.random.default_rng(seed).uniform(size=(n, h, w, 3)).astype(np.float32)


def _nchw(ref, images):
    """The torch input: segjax's own ImageNet normalisation (the PyTorch models expect
    normalised input, the segjax models normalise inside), NCHW."""
    x = np.asarray(imagenet_normalize(images))
    return ref.torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _randomise(ref, net, images):
    """Random BatchNorm affine parameters, running statistics from one training-mode batch
    (so activations stay O(1) through 50+ layers) then jittered; returns `net` in eval mode.

    Untrained BatchNorms (identity statistics and affine) would hide swapped or dropped weights.
    """
    torch = ref.torch
    generator = torch.Generator().manual_seed(0)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5, generator=generator)
            norm.bias.uniform_(-0.5, 0.5, generator=generator)
            norm.momentum = 1.0  # the running statistics become this batch's
        net.train()(_nchw(ref, images))
        for norm in norms:
            norm.running_mean.add_(0.1 * torch.randn(norm.num_features, generator=generator))
            norm.running_var.mul_(torch.empty(norm.num_features).uniform_(0.8, 1.25,
                                                                         generator=generator))
    return net.eval()


def _assert_close(ours, theirs):
    """Within TOLERANCE, relative to the largest activation where that exceeds 1: float32
    sums in another order err in proportion to the magnitude (in float64 the ResNet-50
    features agree to 2e-12, so the difference is rounding, not mapping)."""
    expected = theirs.numpy().transpose(0, 2, 3, 1)
    diff = float(np.abs(np.asarray(ours) - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    assert diff <= TOLERANCE * scale, f"max difference {diff:.3g} at magnitude {scale:.3g}"


def _weights(model) -> dict[str, np.ndarray]:
    """Parameters and BatchNorm statistics by dotted path."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(v)
            for p, v in jax.tree.leaves_with_path(state)}


def _assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)


def _check_round_trip(ref, model, net, scheme):
    """segjax -> torch loads strictly and equals the torch weights it came from; torch -> segjax
    into a copy gives the same weights bitwise."""
    original = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    exported = to_torch_state_dict(model, scheme)
    net.load_state_dict({k: ref.torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    # Into a zeroed copy, so that every array must come from the import.
    copy = nnx.clone(model)
    weights = nnx.state(copy, nnx.Any(nnx.Param, nnx.BatchStat))
    nnx.update(copy, jax.tree.map(jnp.zeros_like, weights))
    _assert_equal(_weights(import_torch_weights(copy, net.state_dict(), scheme)), _weights(model))


def _torchvision_features(net, x):
    """torchvision ResNet's [stem, layer1..4] outputs, as segjax's ResNet returns them."""
    stem = net.relu(net.bn1(net.conv1(x)))
    features = [stem]
    x = net.maxpool(stem)
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        features.append(x)
    return features


# ResNet-34: test_resnet34_into_voc_resnet_encoder.
@pytest.mark.parametrize("name, size", [("resnet18", (64, 64)), ("resnet50", (65, 97))])
def test_resnet_matches_torchvision(ref, name, size, tmp_path):
    net = _randomise(ref, getattr(ref.torchvision.models, name)(), _images(2, *size, seed=1))
    ref.torch.save(net.state_dict(), tmp_path / f"{name}.pth")
    model = import_torch_weights(RESNETS[name](rngs=nnx.Rngs(0)),
                                 load_torch_state_dict(tmp_path / f"{name}.pth"),
                                 "torchvision_resnet")  # fc.* is ignored
    images = _images(2, *size, seed=2)
    model.eval()
    with ref.torch.no_grad():
        expected = _torchvision_features(net, _nchw(ref, images))
    # The encoder takes normalised images.
    for ours, theirs in zip(model(imagenet_normalize(images)), expected, strict=True):
        _assert_close(ours, theirs)
    net.fc = ref.torch.nn.Identity()  # the encoder has no classifier to export
    _check_round_trip(ref, model, net, "torchvision_resnet")


def test_deeplabv3_matches_torchvision(ref):
    segmentation = ref.torchvision.models.segmentation
    net = segmentation.deeplabv3_resnet50(num_classes=NUM_CLASSES, aux_loss=False, weights=None,
                                          weights_backbone=None)
    net = _randomise(ref, net, _images(2, 65, 97, seed=1))  # odd size: resize and padding
    model = import_torch_weights(DeepLabV3(NUM_CLASSES, rngs=nnx.Rngs(0)), net.state_dict(),
                                 "torchvision_deeplabv3")
    images = _images(1, 65, 97, seed=2)
    model.eval()
    with ref.torch.no_grad():
        expected = net(_nchw(ref, images))["out"]
    _assert_close(model(images), expected)
    _check_round_trip(ref, model, net, "torchvision_deeplabv3")


def test_unet_matches_smp(ref):
    net = ref.smp.Unet("resnet34", encoder_weights=None, classes=NUM_CLASSES)
    net = _randomise(ref, net, _images(2, 64, 64, seed=1))  # smp needs multiples of 32
    model = import_torch_weights(Unet(NUM_CLASSES, rngs=nnx.Rngs(0)), net.state_dict(),
                                 "smp_unet")
    images = _images(1, 64, 64, seed=2)
    model.eval()
    with ref.torch.no_grad():
        expected = net(_nchw(ref, images))
    _assert_close(model(images), expected)
    _check_round_trip(ref, model, net, "smp_unet")


def test_darknet53_matches_timm_standalone_and_in_hybrid(ref):
    net = ref.timm.create_model("darknet53", pretrained=False, num_classes=0)
    net = _randomise(ref, net, _images(2, 64, 64, seed=1))
    # timm builds darknet53 with nn.LeakyReLU's default slope, not YOLOv3's 0.1.
    slope = net.stem.conv1.bn.act.negative_slope
    assert slope == 0.01
    model = import_torch_weights(DarkNet53(negative_slope=slope, rngs=nnx.Rngs(0)),
                                 net.state_dict(), "timm_darknet53")
    images = _images(1, 64, 64, seed=2)
    model.eval()
    with ref.torch.no_grad():  # c3, c4, c5: timm's intermediates 3..5 (0 is the stem)
        expected = net.forward_intermediates(_nchw(ref, images), indices=[3, 4, 5],
                                             intermediates_only=True)
    for ours, theirs in zip(model(images), expected, strict=True):
        _assert_close(ours, theirs)
    _check_round_trip(ref, model, net, "timm_darknet53")

    # The same weights into the hybrid model's backbone; its FPN and decoder stay as built.
    full_backbone = {k: v for k, v in SIZES["full"].items() if k.startswith("backbone_")}
    hybrid = HybridQueryModel(1, **{**SIZES["tiny"], **full_backbone}, backbone_negative_slope=slope,
                              rngs=nnx.Rngs(0))
    decoder = nnx.clone(hybrid.decoder)
    import_torch_weights(hybrid.backbone, net.state_dict(), "timm_darknet53")
    _assert_equal(_weights(hybrid.backbone), _weights(model))
    _assert_equal(_weights(hybrid.decoder), _weights(decoder))


def test_resnet34_into_voc_resnet_encoder(ref):
    """ImageNet-style ResNet-34 weights into voc_resnet's encoder; the decoder stays as built."""
    net = _randomise(ref, ref.torchvision.models.resnet34(), _images(2, 64, 64, seed=1))
    model = EncoderDecoder(NUM_CLASSES, encoder="resnet34", rngs=nnx.Rngs(0))
    untouched = nnx.clone(model)
    import_torch_weights(model.encoder, net.state_dict(), "torchvision_resnet")

    def decoder(m):
        return {k: v for k, v in _weights(m).items() if not k.startswith("encoder.")}

    _assert_equal(decoder(model), decoder(untouched))
    images = _images(2, 64, 64, seed=2)
    model.eval()
    with ref.torch.no_grad():
        expected = _torchvision_features(net, _nchw(ref, images))
    for ours, theirs in zip(model.encoder(imagenet_normalize(images)), expected, strict=True):
        _assert_close(ours, theirs)
    net.fc = ref.torch.nn.Identity()
    _check_round_trip(ref, model.encoder, net, "torchvision_resnet")

    # `prefix` selects a submodule's keys (here DataParallel's "module."), both ways; keys
    # outside it are not part of the import.
    wrapped = to_torch_state_dict(model.encoder, "torchvision_resnet", prefix="module.")
    wrapped["aux.weight"] = np.zeros(1, np.float32)
    import_torch_weights(untouched.encoder, wrapped, "torchvision_resnet", prefix="module.")
    _assert_equal(_weights(untouched.encoder), _weights(model.encoder))


def test_import_lists_every_problem_and_changes_nothing(ref):
    torch = ref.torch
    state_dict = ref.torchvision.models.resnet18().state_dict()
    del state_dict["layer1.0.conv1.weight"]
    state_dict["layer1.0.conv3.weight"] = torch.zeros(64, 64, 1, 1)  # Bottleneck-only
    state_dict["head.weight"] = torch.zeros(3)
    state_dict["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    model = RESNETS["resnet18"](rngs=nnx.Rngs(0))
    before = _weights(model)
    with pytest.raises(ValueError, match="cannot import the state dict into ResNet") as info:
        import_torch_weights(model, state_dict, "torchvision_resnet")
    message = str(info.value)
    assert "PyTorch keys that match no rule of the scheme (1):\n  head.weight\n" in message
    assert ("PyTorch keys whose target the model does not have (1):\n  layer1.0.conv3.weight -> "
            "layer1.0.conv3.kernel\n") in message
    assert "model parameters no PyTorch key fills (1):\n  layer1.0.conv1.kernel\n" in message
    assert message.endswith("shape mismatches (1):\n  conv1.weight (64, 1, 7, 7) -> "
                            "conv1.kernel: needs (7, 7, 3, 64), got (7, 7, 1, 64)")
    _assert_equal(_weights(model), before)


def test_scheme_names_and_unmapped_parameters_are_errors():
    model = EncoderDecoder(2, encoder_width=8, decoder_channels=(8, 8, 8, 8, 8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unknown scheme 'resnet'; choose one of \["):
        to_torch_state_dict(model, "resnet")
    # Only the encoder has a torchvision layout; the whole model's decoder has no names.
    with pytest.raises(ValueError, match=r"parameters of EncoderDecoder have no PyTorch name"):
        to_torch_state_dict(model, "torchvision_resnet")


def test_load_torch_state_dict_formats(ref, tmp_path):
    torch = ref.torch
    from safetensors.numpy import save_file
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.count": torch.tensor(3)}
    checkpoints = {"plain.pt": tensors, "lightning.ckpt": {"state_dict": tensors, "epoch": 3},
                   "wrapped.pth": {"model": tensors, "optimizer": {}}}
    for name, saved in checkpoints.items():
        torch.save(saved, tmp_path / name)
        loaded = load_torch_state_dict(tmp_path / name)
        assert loaded.keys() == tensors.keys()
        for key, value in tensors.items():
            np.testing.assert_array_equal(loaded[key], value.numpy())
            assert loaded[key].dtype == value.numpy().dtype
    torch.save({"w": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf16.pt")
    assert load_torch_state_dict(tmp_path / "bf16.pt")["w"].dtype == np.float32
    save_file({"w": np.arange(4, dtype=np.float32)}, tmp_path / "model.safetensors")
    np.testing.assert_array_equal(load_torch_state_dict(tmp_path / "model.safetensors")["w"],
                                  np.arange(4))


def test_load_torch_state_dict_refuses_other_pickles(ref, tmp_path):
    torch = ref.torch
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"module.pt is not a plain state dict: "
                                         r"torch.load\(weights_only=True\) refused it"):
        load_torch_state_dict(tmp_path / "module.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict of tensors"):
        load_torch_state_dict(tmp_path / "list.pt")
    torch.save({"w": torch.zeros(1), "step": 7}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match="entries are not name -> tensor: step$"):
        load_torch_state_dict(tmp_path / "mixed.pt")
