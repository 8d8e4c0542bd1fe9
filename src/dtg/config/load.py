"""Loading a configuration: defaults, a YAML file over them, then ``--set a.b=c``; stored configs.

A YAML file overrides any subset of keys; command-line overrides ``a.b=c`` are applied last and
parsed as YAML scalars/lists. A key of the layout before issue 21 is refused naming its new key;
a config stored in that layout (an older checkpoint's, a run's ``run.yaml``) is read through
:func:`upgrade_legacy` (:func:`from_dict`), the one reader of that layout (the one-time migration of
run keys, :mod:`dtg.run_migration`, hashes it to recognise the keys before issue 27).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from dtg.config.checks import ConfigError, _coerce, check_relations
from dtg.config.schema import Config, neutral_values


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict of updates to a dataclass instance in place."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping")
    hints = typing.get_type_hints(type(obj), include_extras=True)
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names and key in RENAMED:
            raise renamed_error(key)
        if name not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict) and key in RENAMED:  # dtg.rpn / dtg.rcnn: once a switch
                raise renamed_error(key)
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))




# ----------------------------------------------------------------------------- renamed keys
#
# Issue 21 gave DTG one section per stage (dtg.rcnn, dtg.rpn), renamed Rank Matching's weight and
# moved the sparse baseline's keys out of semi. An old key in a YAML file or a --set override is a
# ConfigError naming its new key; configs stored by older runs (checkpoints, run.yaml) are read
# through upgrade_legacy.

_STAGE_SWITCHES = ("inc_cls", "inc_reg", "rank_matching", "reg_target")  # once shared, with per-stage overrides
_MOVED = {  # old key -> new key
    "dtg.rpn": "dtg.rpn.enabled", "dtg.rcnn": "dtg.rcnn.enabled",
    **{f"dtg.{st}_{k}": f"dtg.{st}.{k}" for st in ("rcnn", "rpn") for k in _STAGE_SWITCHES},
    "dtg.rpn_targets": "dtg.rpn.targets", "dtg.rcnn_subsample": "dtg.rcnn.subsample",
    "dtg.rpn_candidates": "dtg.rpn.candidates", "dtg.rpn_cls_loss": "dtg.rpn.cls_loss",
    "dtg.tau_rpn": "dtg.rpn.tau", "dtg.tau_rcnn": "dtg.rcnn.tau",
    "dtg.rpn_nms": "dtg.rpn.nms", "dtg.rcnn_nms": "dtg.rcnn.nms",
    "dtg.uncertain_rpn": "dtg.rpn.uncertain", "dtg.uncertain_rcnn": "dtg.rcnn.uncertain",
    "dtg.anchor_radius": "dtg.rpn.anchor_radius", "dtg.anchor_level": "dtg.rpn.anchor_level",
    "dtg.anchor_ties": "dtg.rpn.anchor_ties", "dtg.beta": "dtg.rm_weight",
    **{f"semi.{k}": f"sparse.{k}" for k in ("pseudo_score_thresh", "class_thresholds", "uncertain_score_thresh",
                                             "unsup_cls_loss", "unsup_reg")},
}
# old key -> its new key(s) (a once-shared switch is now one key per stage)
RENAMED: dict[str, tuple[str, ...]] = {
    **{k: (v,) for k, v in _MOVED.items()},
    **{f"dtg.{k}": (f"dtg.rcnn.{k}", f"dtg.rpn.{k}") for k in _STAGE_SWITCHES},
}


def renamed_error(key: str) -> ConfigError:
    """The one-line error of an old ``key`` (:data:`RENAMED`)."""
    new = "' and '".join(RENAMED[key])
    return ConfigError(f"config key '{key}' was renamed: use '{new}'")


def _is_legacy(data: dict) -> bool:
    dtg, semi = data.get("dtg"), data.get("semi")
    old_dtg = isinstance(dtg, dict) and any(
        f"dtg.{k}" in RENAMED and not (k in ("rpn", "rcnn") and isinstance(v, dict)) for k, v in dtg.items())
    return old_dtg or (isinstance(semi, dict) and any(f"semi.{k}" in RENAMED for k in semi))


def upgrade_legacy(data: dict) -> dict:
    """A config dict stored before issue 21 (a checkpoint's, a run's ``run.yaml``) in today's layout;
    any other dict unchanged. A per-stage override (``dtg.rcnn_inc_reg``) wins over its shared switch."""
    if not isinstance(data, dict) or not _is_legacy(data):
        return data
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    dtg, semi = out.pop("dtg", None) or {}, out.get("semi") or {}
    new_dtg: dict = {"rcnn": {}, "rpn": {}}
    for k, v in dtg.items():
        if k in ("rcnn", "rpn") and isinstance(v, dict):
            new_dtg[k].update(v)
        elif k in _STAGE_SWITCHES:
            for st in ("rcnn", "rpn"):
                if dtg.get(f"{st}_{k}") is None:
                    new_dtg[st][k] = v
        elif f"dtg.{k}" in _MOVED:
            if v is None and k.partition("_")[2] in _STAGE_SWITCHES:
                continue  # an unset per-stage override: the shared switch above
            _set_path(new_dtg, _MOVED[f"dtg.{k}"].split(".")[1:], v)
        elif k.partition("_")[0] in ("rcnn", "rpn"):  # a stage key added after issue 21, stored as <stage>_<key>
            stage, _, name = k.partition("_")
            new_dtg[stage][name] = v
        else:
            new_dtg[k] = v
    out["dtg"] = new_dtg
    if semi:
        sparse = dict(out.get("sparse") or {})
        out["semi"] = {k: v for k, v in semi.items() if f"semi.{k}" not in _MOVED}
        sparse.update({_MOVED[f"semi.{k}"].split(".")[1]: v for k, v in semi.items() if f"semi.{k}" in _MOVED})
        out["sparse"] = sparse
    return out


def _set_path(node: dict, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def parse_override(text: str) -> dict:
    """``"a.b=c"`` -> ``{"a": {"b": c}}`` with ``c`` parsed as a YAML value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    path, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict = {}
    node = out
    parts = path.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then each ``key=value`` override."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        try:
            _apply(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        apply_override(cfg, text)
    check_relations(cfg)
    return cfg


def apply_override(cfg: Config, text: str) -> None:
    """Apply one ``key=value`` override to ``cfg`` in place (:class:`ConfigError` on a bad key or value)."""
    _apply(cfg, parse_override(text))


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a config (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Inverse of :func:`to_dict`, with the same checks as :func:`load_config`; a dict stored in the
    layout before issue 21 (an older checkpoint or run) is read as well (:func:`upgrade_legacy`).

    A key the stored dict lacks that declares a neutral value (``Annotated[..., Neutral(v)]``) reads
    as that value, not as today's default: the dict was written before the key existed, so its run
    behaved as the neutral value does (a default changed later must not change an old run on resume).
    """
    cfg = Config()
    _apply(cfg, with_neutral_values(upgrade_legacy(data)))
    check_relations(cfg)
    return cfg


def with_neutral_values(data: dict) -> dict:
    """``data`` (a stored config dict) with every absent key that declares a neutral value set to it."""
    if not isinstance(data, dict):
        return data
    out = copy.deepcopy(data)
    for key, value in neutral_values().items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):  # a malformed section: left for _apply to name
                break
            node = child
        else:
            node.setdefault(parts[-1], copy.deepcopy(value))
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
