"""PyTorch state dicts in and out of segjax models, through the tables in `schemes.py`.

  state_dict = load_torch_state_dict("resnet34.pth")          # or .safetensors
  import_torch_weights(model.encoder, state_dict, "torchvision_resnet")
  torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in
                               to_torch_state_dict(model, "smp_unet").items()})

Importing is all or nothing: every PyTorch key is used or deliberately ignored by the scheme,
every parameter and BatchNorm statistic of the module is filled, and every shape agrees;
otherwise one error lists every problem and the module is left untouched. torch is imported
only to read pickled checkpoints.
"""
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from segjax.bridge.schemes import SCHEMES, Scheme


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a state dict from a `.safetensors` file or a PyTorch pickle (`.pt`, `.pth`, `.bin`).

    Pickles are read with `torch.load(weights_only=True)`, which runs no code from the file; a
    checkpoint {"state_dict": ...} or {"model": ...} is unwrapped. Arrays keep the tensors'
    dtypes, except those numpy lacks (bfloat16), which become float32.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(path)
    import torch
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a plain state dict: torch.load(weights_only=True) refused it (it "
            "pickles Python objects, e.g. a whole nn.Module); save `model.state_dict()` "
            "instead") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    not_tensors = [str(k) for k, v in loaded.items()
                   if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        raise ValueError(f"{path} is not a state dict of tensors; these entries are not "
                         f"name -> tensor: {', '.join(not_tensors)}")
    return {key: _to_numpy(value) for key, value in loaded.items()}


def import_torch_weights(model: nnx.Module, state_dict: Mapping, scheme: str | Scheme, *,
                         prefix: str = "", keep: Sequence[str] = ()) -> nnx.Module:
    """Fill `model`'s parameters and BatchNorm statistics from a PyTorch state dict, in place.

    `model` may be a submodule (`voc_model.encoder`, `hybrid.backbone`): the scheme's paths are
    relative to it and the rest of the parent model is left as it is. `prefix` selects the keys
    under it and strips it ("backbone." to take a DeepLabV3's ResNet, "module." for
    DataParallel checkpoints); other keys are not part of the import. Values may be numpy arrays
    or torch tensors; they are cast to each parameter's dtype. `keep`: regexes of model paths
    that keep their own values (a re-initialised head); their PyTorch keys are skipped. Returns
    `model`.
    """
    scheme = _scheme(scheme)
    variables = _variables(model)
    updates, unmatched, no_target, mismatched = {}, [], [], []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        found = scheme.target_of(name)
        if found is None:
            if not scheme.is_ignored(name):
                unmatched.append(key)
            continue
        path, rule = found
        if any(re.fullmatch(pattern, path) for pattern in keep):
            continue
        if path not in variables:
            no_target.append(f"{key} -> {path}")
            continue
        array = _to_numpy(value)
        source_shape = array.shape
        if rule.layout is not None:
            array = array.transpose(rule.layout)
        expected = tuple(variables[path].shape)
        if rule.split is not None and array.shape == _merged(expected, rule.split):
            array = array.reshape(expected)
        if array.shape != expected:
            mismatched.append(f"{key} {source_shape} -> {path}: needs {expected}, "
                              f"got {array.shape}")
        updates[path] = array
    unfilled = sorted(path for path in set(variables) - set(updates)
                      if not any(re.fullmatch(pattern, path) for pattern in keep))
    problems = [("PyTorch keys that match no rule of the scheme", unmatched),
                ("PyTorch keys whose target the model does not have", no_target),
                ("model parameters no PyTorch key fills", unfilled),
                ("shape mismatches", mismatched)]
    if any(items for _, items in problems):
        raise ValueError(
            f"cannot import the state dict into {type(model).__name__}:\n" + "\n".join(
                f"{title} ({len(items)}):\n  " + "\n  ".join(items)
                for title, items in problems if items))
    for path, array in updates.items():
        variables[path][...] = jnp.asarray(array, variables[path].dtype)
    return model


def to_torch_state_dict(model: nnx.Module, scheme: str | Scheme, *,
                        prefix: str = "") -> dict[str, np.ndarray]:
    """The exact inverse of `import_torch_weights`: {PyTorch key: numpy array} in PyTorch's
    layout and the parameters' dtype, for `torch_model.load_state_dict` after `torch.from_numpy`.

    Keys deliberately ignored on import (num_batches_tracked, classifiers segjax does not build)
    are not produced; PyTorch's BatchNorm loads without its counter.
    """
    scheme = _scheme(scheme)
    state_dict, unmapped = {}, []
    for path, variable in sorted(_variables(model).items()):
        found = scheme.source_of(path)
        if found is None:
            unmapped.append(path)
            continue
        key, rule = found
        array = np.asarray(variable[...])
        if rule.split is not None:
            array = array.reshape(_merged(array.shape, rule.split))
        if rule.layout is not None:
            array = array.transpose(np.argsort(rule.layout))
        state_dict[prefix + key] = np.array(array, order="C")  # writable, as torch.from_numpy wants
    if unmapped:
        raise ValueError(f"{len(unmapped)} parameters of {type(model).__name__} have no PyTorch "
                         f"name in the scheme:\n  " + "\n  ".join(unmapped))
    return state_dict


def _scheme(scheme: str | Scheme) -> Scheme:
    if isinstance(scheme, Scheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def _variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """The module's parameters and BatchNorm statistics by dotted path (RNG state is no weight)."""
    return {".".join(map(str, path)): node for path, node in nnx.iter_graph(model)
            if isinstance(node, (nnx.Param, nnx.BatchStat))}


def _merged(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """`shape` with axes `axis` and `axis + 1` merged into one."""
    return (*shape[:axis], shape[axis] * shape[axis + 1], *shape[axis + 2:])


def _to_numpy(value) -> np.ndarray:
    """A numpy array from an array or a torch tensor, without importing torch."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        try:
            return value.numpy()
        except TypeError:  # a dtype numpy lacks (bfloat16); float32 holds it exactly
            return value.float().numpy()
    return np.asarray(value)
