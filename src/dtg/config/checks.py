"""The configuration's checks: a value against its key's type and range, and the checks between keys.

An unknown key, a value of the wrong type or out of its range raises :class:`ConfigError`
naming the key (one line).
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

from dtg.config.schema import Config, Neutral


class ConfigError(ValueError):
    """A configuration key is unknown, its value has the wrong type or lies outside its range."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def allowed_range(meta: Any) -> str:
    """An annotated-types bound as text: ``[0, 1]``, ``[0, 1)``, ``> 0``, ``>= 1``."""
    b = {k: getattr(meta, k, None) for k, _ in _BOUNDS}
    lo = ("(", b["gt"]) if b["gt"] is not None else ("[", b["ge"]) if b["ge"] is not None else None
    hi = (b["lt"], ")") if b["lt"] is not None else (b["le"], "]") if b["le"] is not None else None
    if lo and hi:
        return f"{lo[0]}{lo[1]:g}, {hi[0]:g}{hi[1]}"
    return " and ".join(f"{sym} {b[k]:g}" for k, sym in _BOUNDS if b[k] is not None)


def _in_range(value: Any, meta: Any) -> bool:
    b = {k: getattr(meta, k, None) for k, _ in _BOUNDS}
    return ((b["gt"] is None or value > b["gt"]) and (b["ge"] is None or value >= b["ge"])
            and (b["lt"] is None or value < b["lt"]) and (b["le"] is None or value <= b["le"]))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (type, then range); return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *meta = typing.get_args(tp)
        value = _coerce(value, base, key)
        for m in meta:
            if not isinstance(m, Neutral) and not _in_range(value, m):
                raise ConfigError(f"config key '{key}': {value!r} is out of range (allowed: {allowed_range(m)})")
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        for e in errors:  # the right type, the wrong range: say which range
            if "out of range" in e:
                raise ConfigError(e)
        raise ConfigError(f"config key '{key}': {value!r} does not have type {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")  # pragma: no cover



PAIRS = ("data.labeled_view.short_edge", "data.weak_view.short_edge", "data.strong_view.short_edge",
         "data.labeled_view.cutout_patches", "data.weak_view.cutout_patches", "data.strong_view.cutout_patches",
         "data.labeled_view.cutout_frac", "data.weak_view.cutout_frac", "data.strong_view.cutout_frac",
         "synth.image_size", "synth.object_size", "synth.objects_per_image", "synth.distractors_per_image")


def check_relations(cfg: Config) -> None:
    """Checks between keys (a key's own range is checked when it is set): ``[min, max]`` pairs,
    at most one background cut in DTG's R-CNN stage, and an increasing ``solver.steps`` below ``solver.max_iter``. :class:`ConfigError` naming the key."""
    for key in PAIRS:
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if len(node) != 2 or node[0] > node[1]:
            raise ConfigError(f"config key '{key}': {node!r} must be a [min, max] pair with min <= max")
    if cfg.dtg.rcnn.subsample and cfg.dtg.rcnn.background:
        raise ConfigError(f"config key 'dtg.rcnn.subsample': true needs dtg.rcnn.background=0 (it is "
                          f"{cfg.dtg.rcnn.background}; two ways of cutting the background RoIs, use one)")
    steps, max_iter = cfg.solver.steps, cfg.solver.max_iter
    if any(b <= a for a, b in zip(steps, steps[1:])) or any(x >= max_iter for x in steps):
        raise ConfigError(f"config key 'solver.steps': {steps!r} must be increasing and below "
                          f"solver.max_iter ({max_iter}); a shorter schedule needs its own steps")

