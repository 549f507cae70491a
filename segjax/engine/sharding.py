"""Parameter sharding by config: an ordered list of (regex over state paths, rule), big_vision style.

A path is a state leaf's keys joined by "/" ("backbone/stages/0/conv/kernel"). The first rule
whose regex matches (`re.search`) decides; unmatched tensors are replicated. Optimizer state takes
the sharding of the parameter it belongs to, so params and their moments always agree.

Rules:
  replicate          a full copy on every device (e.g. a frozen backbone while the rest is sharded)
  fsdp               split the largest dimension that the `fsdp` axis size divides; tensors under
                     `min_bytes` stay replicated; when no dimension divides, logged and replicated
  shard_dim:DIM:AXIS split dimension DIM over mesh axis AXIS (logged and replicated if it does not divide)
"""
from __future__ import annotations

import logging
import math
import re
from typing import NamedTuple

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("segjax")


class Rule(NamedTuple):
    pattern: re.Pattern
    kind: str  # replicate | fsdp | shard_dim
    dim: int = 0
    axis: str = "fsdp"


def regex_and_value(text: str, otherwise: str) -> tuple[re.Pattern, str]:
    """`REGEX=VALUE` (the last "=" splits) -> (compiled regex, value); a ValueError naming `text`
    when it has no "=" (`otherwise` says what it should be) or a bad regex. Parameter groups share it."""
    regex, sep, value = text.rpartition("=")
    if not sep:
        raise ValueError(f"{text!r} {otherwise}")
    try:
        return re.compile(regex), value
    except re.error as e:
        raise ValueError(f"{text!r}: bad regex ({e})") from None


def parse_rules(rules: tuple[str, ...] | list[str]) -> list[Rule]:
    """`"REGEX=RULE"` strings -> rules; ValueError names the bad entry and the valid forms."""
    parsed = []
    for text in rules:
        pattern, rule = regex_and_value(text, "is not REGEX=RULE")
        kind, *args = rule.strip().split(":")
        if kind in ("replicate", "fsdp") and not args:
            parsed.append(Rule(pattern, kind))
        elif kind == "shard_dim" and len(args) == 2 and args[0].lstrip("-").isdigit() and args[1]:
            parsed.append(Rule(pattern, kind, int(args[0]), args[1]))
        else:
            raise ValueError(f"{text!r}: the rule must be replicate, fsdp or shard_dim:DIM:AXIS")
    return parsed


def path_name(path) -> str:
    """"a/b/0/kernel" from a jax key path (Variable `.value` attributes left out)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
    return "/".join(parts)


def _spec(name: str, shape: tuple, nbytes: int, rules: list[Rule], mesh: jax.sharding.Mesh, min_bytes: int) -> P:
    rule = next((r for r in rules if r.pattern.search(name)), None)
    if rule is None or rule.kind == "replicate":
        return P()
    if rule.kind == "shard_dim":
        if rule.axis not in mesh.shape:
            raise ValueError(f"sharding rule for {name}: no mesh axis {rule.axis!r} (axes: {list(mesh.shape)})")
        size = mesh.shape[rule.axis]
        dim = rule.dim % len(shape) if shape else None
        if size == 1:
            return P()
        if dim is None or shape[dim] % size:
            log.info("sharding: %s %s: dimension %s does not split over %s=%d; replicated",
                     name, shape, rule.dim, rule.axis, size)
            return P()
        return P(*[rule.axis if d == dim else None for d in range(len(shape))])
    size = mesh.shape["fsdp"]
    if size == 1 or nbytes < min_bytes or not shape:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % size == 0:
            return P(*["fsdp" if d == dim else None for d in range(len(shape))])
    log.info("sharding: %s %s: no dimension divides by fsdp=%d; replicated", name, shape, size)
    return P()


def state_shardings(model_state, opt_state, mesh: jax.sharding.Mesh, rules: list[Rule], min_bytes: int):
    """NamedShardings for (model_state, opt_state), abstract or concrete, by the rules."""
    specs = {}

    def model_leaf(path, x):
        name = path_name(path)
        specs[name] = (x.shape, _spec(name, x.shape, x.size * x.dtype.itemsize, rules, mesh, min_bytes))
        return NamedSharding(mesh, specs[name][1])

    def opt_leaf(path, x):
        # Moments of a parameter sit under a prefix ("opt_state/0/mu/" + the parameter's path).
        name = path_name(path).split("/")
        for start in range(len(name)):
            shape, spec = specs.get("/".join(name[start:]), (None, None))
            if shape == x.shape:
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, _spec("/".join(name), x.shape, x.size * x.dtype.itemsize, rules, mesh, min_bytes))

    model_shardings = jax.tree_util.tree_map_with_path(model_leaf, model_state)
    return model_shardings, jax.tree_util.tree_map_with_path(opt_leaf, opt_state)


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (abstract or concrete) placed with `shardings`."""
    sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize,
                         tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def describe(tree, shardings) -> str:
    """One log line: how many tensors are split and what one device holds."""
    leaves, specs = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    split = sum(1 for s in specs if any(p is not None for p in s.spec))
    whole = sum(x.size * x.dtype.itemsize for x in leaves)
    return (f"{split} of {len(leaves)} state tensors sharded; {per_device_bytes(tree, shardings) / 2**20:.1f} MiB "
            f"per device of {whole / 2**20:.1f} MiB")


def create_sharded(create, mesh: jax.sharding.Mesh, rules: list[Rule], min_bytes: int) -> tuple:
    """Runs `create() -> (model, optimizer)` under jit with the rules' output shardings, so every
    tensor is born in its place and the whole state never sits on one device. Returns (model_def
    (training mode), eval_def, opt_def, model_state, opt_state, shardings)."""
    abstract_model, abstract_opt = nnx.eval_shape(create)
    model_def, model_abstract = nnx.split(abstract_model)
    opt_def, opt_abstract = nnx.split(abstract_opt)
    shardings = state_shardings(model_abstract, opt_abstract, mesh, rules, min_bytes)

    def init():
        model, optimizer = create()
        return nnx.state(model), nnx.state(optimizer)

    model_state, opt_state = jax.jit(init, out_shardings=shardings)()
    log.info("sharding: %s", describe((model_state, opt_state), shardings))
    abstract_model.eval()
    return model_def, nnx.graphdef(abstract_model), opt_def, model_state, opt_state, shardings
