"""Conversion as a key-mapping table plus per-key value hooks.

A :class:`Rule` matches source (PyTorch state-dict) keys with a regular expression
and names the target leaf in our parameter tree with a template that may use the
regex groups. A rule may stack: ``stack_group`` names the group holding a layer
index, and the leaf then gets a leading layer axis. Hooks turn the torch value into
ours (transpose a Linear weight, ...). The finished tree is checked against the
model's abstract tree (``jax.eval_shape``): a source key no rule takes, a target
leaf nothing filled, and a shape that disagrees are each an error naming the key.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from mvjax.core.errors import MvjaxError


class ConversionError(MvjaxError, ValueError):
    """The checkpoint does not fit the model that its own config describes."""


Hook = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_weight(x: np.ndarray) -> np.ndarray:
    """torch ``Linear.weight`` is (out, in); a Flax ``Dense.kernel`` is (in, out)."""
    if x.ndim != 2:
        raise ConversionError(f"expected a 2-D Linear weight, got shape {x.shape}")
    return x.T


@dataclasses.dataclass(frozen=True)
class Rule:
    source: str  # regex, full match against the stripped source key
    target: str | None  # '/'-separated target path, str.format'ed with the named groups; None = consumed, no leaf
    hook: Hook = identity
    stack_group: str | None = None  # named group holding the index on the stacked leading axis


def readable_key(pattern: str, **groups) -> str:
    """A rule's source regex as a key name: ``transformer\\.h\\.(?P<layer>\\d+)\\.x`` -> ``transformer.h.{layer}.x``."""
    text = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace("\\.", ".")
    for name, value in groups.items():
        text = text.replace("{" + name + "}", str(value))
    return text


def strip_prefix(state: Mapping[str, Any], prefix: str = "_orig_mod.") -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        new = key[len(prefix):] if key.startswith(prefix) else key
        if new in out:
            raise ConversionError(f"key {new!r} appears both with and without the {prefix!r} prefix")
        out[new] = value
    return out


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, path))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def apply_rules(
    state: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    expected: Mapping[str, Any],
    dtype: np.dtype = np.dtype(np.float32),
) -> dict[str, Any]:
    """Map ``state`` through ``rules`` into a nested dict matching ``expected``.

    ``expected`` is the abstract parameter tree (leaves with ``.shape``).
    """
    rules = list(rules)
    compiled = [(re.compile(r.source), r) for r in rules]
    expected_flat = flatten_tree(expected)
    plain: dict[str, tuple[str, np.ndarray]] = {}
    stacked: dict[str, dict[int, tuple[str, np.ndarray]]] = {}
    stack_rules: dict[str, Rule] = {}

    for key in sorted(state):
        matches = [(m, r) for pattern, r in compiled if (m := pattern.fullmatch(key))]
        if not matches:
            raise ConversionError(f"unused checkpoint key {key!r}: no rule of this layout takes it")
        match, rule = matches[0]
        value = rule.hook(np.asarray(state[key]))
        if rule.target is None:
            continue
        target = rule.target.format(**match.groupdict())
        if rule.stack_group is None:
            if target in plain:
                raise ConversionError(f"keys {plain[target][0]!r} and {key!r} both map to {target!r}")
            plain[target] = (key, value)
        else:
            index = int(match.group(rule.stack_group))
            layers = stacked.setdefault(target, {})
            stack_rules[target] = rule
            layers[index] = (key, value)

    produced: dict[str, tuple[str, np.ndarray]] = dict(plain)
    for target, layers in stacked.items():
        want = expected_flat.get(target)
        n = want.shape[0] if want is not None else max(layers) + 1
        extra = sorted(i for i in layers if i >= n)
        if extra:
            raise ConversionError(f"unused checkpoint key {layers[extra[0]][0]!r}: the config has only {n} layers")
        missing = [i for i in range(n) if i not in layers]
        if missing:
            rule = stack_rules[target]
            name = readable_key(rule.source, **{rule.stack_group: missing[0]})
            raise ConversionError(f"missing checkpoint key {name!r} (layer {missing[0]}) for parameter {target!r}")
        shapes = {layers[i][1].shape for i in range(n)}
        if len(shapes) != 1:
            raise ConversionError(f"layers of {target!r} disagree in shape: {sorted(shapes)}")
        produced[target] = (layers[0][0], np.stack([layers[i][1] for i in range(n)]))

    for target, (key, value) in produced.items():
        if target not in expected_flat:
            raise ConversionError(f"unused checkpoint key {key!r}: the model has no parameter {target!r}")
    for target, want in expected_flat.items():
        if target not in produced:
            name = ""
            for rule in rules:
                match = rule.target is not None and _template_match(rule.target, target)
                if match:
                    name = f" {readable_key(rule.source, **match.groupdict())!r}"
                    break
            raise ConversionError(f"missing checkpoint key{name} for parameter {target!r}")
        key, value = produced[target]
        if tuple(value.shape) != tuple(want.shape):
            raise ConversionError(
                f"checkpoint key {key!r} has shape {tuple(value.shape)} after conversion, "
                f"the model expects {tuple(want.shape)} for {target!r}"
            )
    return _unflatten({t: np.ascontiguousarray(v.astype(dtype)) for t, (_, v) in produced.items()})


def _template_match(template: str, target: str) -> re.Match | None:
    """Match a target path against a rule's target template, capturing its fields."""
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    return re.fullmatch(pattern, target)
