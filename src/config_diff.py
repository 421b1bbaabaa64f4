"""Which values of two configs differ, as flat dotted names (model.base_channels, schedule.name, ...)."""

from __future__ import annotations

UNSET = "<unset>"


def select(tree: dict, dotted: str):
    """tree["a"]["b"] for "a.b"; {} where a part is missing."""
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def flatten(value, prefix: str) -> dict:
    """{"prefix.a.b": leaf, ...} for a nested dict; {prefix: value} for a leaf."""
    if isinstance(value, dict) and value:
        flat = {}
        for k, v in value.items():
            flat.update(flatten(v, f"{prefix}.{k}"))
        return flat
    return {} if isinstance(value, dict) else {prefix: value}


def differences(old: dict, new: dict, keys, skip=lambda name: False) -> list[tuple[str, object, object]]:
    """(name, old value, new value) for every leaf under `keys` on which the plain dicts old and new
    differ; a leaf missing on one side reads UNSET. `skip(name)` drops names the caller ignores."""
    diffs = []
    for key in keys:
        a, b = flatten(select(old, key), key), flatten(select(new, key), key)
        for name in sorted(a.keys() | b.keys()):
            if a.get(name, UNSET) != b.get(name, UNSET) and not skip(name):
                diffs.append((name, a.get(name, UNSET), b.get(name, UNSET)))
    return diffs
