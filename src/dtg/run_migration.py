"""The moves of cached runs to today's run keys: the config layout (issue 27), a branch's start (issue 25).

Until issue 27 run keys were hashed over the flat layout from before issue 21 (flat ``dtg.*``, the
sparse keys in ``semi``; :func:`flat_dict`), with the keys added later listed at their neutral values
and the runs of the methods that never read ``dtg.*`` hashed with DTG's defaults from before issue 25.
Today they are hashed over today's layout (:func:`dtg.run_identity.hashed_dict`). :func:`migrate`
renames each run folder ``RUNS/<old key>`` to ``RUNS/<key>``, a branch's folder included
(:func:`dtg.run_identity.branch_key` over the new keys of the run and of its parent), and points
what the folder records at its new name (``output_dir`` in ``run.yaml`` / ``config.yaml``,
``provenance.config_hash`` in ``metrics.json``). The old hashing lives here only, frozen, to
recognise the old names: a folder is renamed only when its name is the old key of the config it
holds, on the dataset fingerprint its ``metrics.json`` recorded or the data's fingerprint now.

Until issue 25 moved the testbed to 3000 iterations, a branch's key named the whole supervised run
it started from (:func:`dtg.run_identity.run_key` of the parent); today it names the weights it
starts from (:func:`dtg.run_identity.start_key`), which a 2000- and a 3000-iteration supervised run
share at ``semi.burn_in``. A branch under its parent-named key (in either layout, the parent a
plain run in the same folder with the same supervised part up to the branch point) is renamed too.

Safe to interrupt and idempotent: each folder is one ``os.rename`` (skipped while a process trains
in it: its lock is held) and each rewritten file one ``os.replace``; a folder already under its new
key only gets its records checked. Once nothing is left to rename, ``RUNS/.run-keys`` says so and
``dtg bench reproduce`` (which calls :func:`migrate` on its ``--out``) skips the scan;
``dtg bench migrate OUT`` always scans.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import yaml

from dtg.config import Config, DTGConfig, RcnnStageConfig, RpnStageConfig, StageConfig, from_dict, to_dict
from dtg.config.load import _MOVED, _STAGE_SWITCHES
from dtg.engine.run_folder import RunLock
from dtg.run_identity import branch_key, config_hash, dataset_fingerprint, run_key, start_key, supervised_part

MARKER = ".run-keys"  # in RUNS: its folders are named by today's run keys
LAYOUT = "issue 27: run keys over today's config layout; issue 25: branch keys name their start"


def flat_dict(cfg: Config) -> dict:
    """``cfg`` as a plain nested dict in the layout before issue 21 (flat ``dtg``, the sparse keys in
    ``semi``): what run keys were hashed over until issue 27 (:func:`flat_run_key`). Equal to that layout's ``to_dict`` for every config it could
    express; a stage switch is written as the shared switch when both stages agree, else as the
    differing stage's override (the shared switch at its default)."""
    data = to_dict(cfg)
    d, sparse = data.pop("dtg"), data.pop("sparse")
    data["semi"] = {**data["semi"], **sparse}
    rcnn, rpn = d.pop("rcnn"), d.pop("rpn")
    flat: dict[str, Any] = {"rpn": rpn.pop("enabled"), "rcnn": rcnn.pop("enabled")}
    defaults = StageConfig()
    for k in _STAGE_SWITCHES:
        a, b, default = rcnn.pop(k), rpn.pop(k), getattr(defaults, k)
        if a == b:
            flat.update({k: a, f"rcnn_{k}": None, f"rpn_{k}": None})
        else:
            flat.update({k: default, f"rcnn_{k}": None if a == default else a, f"rpn_{k}": None if b == default else b})
    for old, new in _MOVED.items():
        parts = new.split(".")
        if parts[0] == "dtg" and len(parts) == 3 and parts[2] not in _STAGE_SWITCHES + ("enabled",):
            flat[old.split(".", 1)[1]] = (rcnn if parts[1] == "rcnn" else rpn).pop(parts[2])
    flat["beta"] = d.pop("rm_weight")
    flat.update(d)  # normalize, rm_input, T
    for stage, rest in (("rcnn", rcnn), ("rpn", rpn)):  # keys added after issue 21: "<stage>_<key>"
        flat.update({f"{stage}_{k}": v for k, v in rest.items()})
    data["dtg"] = flat
    return data



# ----------------------------------------------------------------------------- the keys before issue 27 (frozen)

_VOLATILE = ("output_dir", "threads", "log_period", "checkpoint_period", "checkpoint_at", "target_images")
_NEUTRAL = {  # keys of the flat layout
    "cpu_kernels": "fast", "semi.class_thresholds": [], "semi.strong_bn_stats": True, "dtg.rm_scale": "clusters",
    "dtg.rpn_transfer": "max", "dtg.rcnn_member_iou": 0.0, "dtg.rcnn_member_topk": False, "dtg.rcnn_proposals": 0,
    "dtg.rcnn_background": 0, "dtg.rcnn_append_kept": False, "dtg.rpn_subsample": False,
}
_DTG_BLIND = ("supervised", "sparse", "oracle")
# every key whose default may change spelled out, so that this stays what the old code hashed
_DTG_BEFORE_ISSUE_25 = DTGConfig(
    rcnn=RcnnStageConfig(uncertain=0.1, subsample=False, member_iou=0.0, member_topk=False, proposals=0,
                          background=0, append_kept=False),
    rpn=RpnStageConfig(targets="dtg", transfer="max", subsample=False), normalize="samples", rm_weight=3.0,
    rm_scale="clusters")
_SUPERVISED_IGNORES = ("method", "checkpoint_at", "dtg", "semi", "data.batch_unlabeled", "data.weak_view",
                       "data.strong_view")


def _drop(data: dict[str, Any], keys: Any) -> None:
    for key in keys:
        head, _, tail = key.partition(".")
        (data.get(head, {}).pop(tail, None) if tail else data.pop(head, None))


def _flat_hashed(cfg: Config) -> dict[str, Any]:
    if cfg.method in _DTG_BLIND:
        cfg = dataclasses.replace(cfg, dtg=_DTG_BEFORE_ISSUE_25)
    data = json.loads(json.dumps(flat_dict(cfg)))
    _drop(data, _VOLATILE)
    flat = {k: data[k.split(".")[0]].get(k.split(".")[1]) if "." in k else data.get(k) for k in _NEUTRAL}
    _drop(data, [k for k, v in _NEUTRAL.items() if flat[k] == v])
    return data


def flat_run_key(cfg: Config, fingerprint: str) -> str:
    """The run key of ``cfg`` on the data of ``fingerprint`` as it was until issue 27."""
    sha = lambda text: hashlib.sha1(text.encode()).hexdigest()[:12]  # noqa: E731
    if cfg.method == "supervised":
        full = json.loads(json.dumps(flat_dict(cfg)))
        data = _flat_hashed(cfg)
        _drop(data, _SUPERVISED_IGNORES)
        part = {**data, "reads": {"semi.ema_momentum": full["semi"]["ema_momentum"]}}
        return sha(f"supervised:{sha(json.dumps(part, sort_keys=True))}:{fingerprint}")
    return sha(f"{sha(json.dumps(_flat_hashed(cfg), sort_keys=True))}:{fingerprint}")


# ----------------------------------------------------------------------------- the migration


def _stored_config(folder: Path) -> Config | None:
    """The config a run folder holds (``run.yaml``, else ``config.yaml``); None when there is none readable."""
    for name in ("run.yaml", "config.yaml"):
        try:
            return from_dict(yaml.safe_load((folder / name).read_text()))
        except Exception:  # noqa: BLE001 - unreadable: try the next record
            continue
    return None


def _recorded_fingerprint(folder: Path) -> str | None:
    try:
        return json.loads((folder / "metrics.json").read_text())["provenance"]["dataset_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.migrate")
    tmp.write_text(text)
    os.replace(tmp, path)


def _point_records(folder: Path, cfg: Config, old: str) -> None:
    """Point ``folder``'s records at its name: ``output_dir`` of its yaml files, ``config_hash`` of its metrics."""
    for name in ("run.yaml", "config.yaml"):
        path = folder / name
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and isinstance(data.get("output_dir"), str):
            want = str(Path(data["output_dir"]).parent / folder.name)
            if data["output_dir"] != want:
                data["output_dir"] = want
                _write(path, yaml.safe_dump(data, sort_keys=False))
    path = folder / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
        prov = metrics["provenance"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if isinstance(prov, dict) and prov.get("config_hash") != config_hash(cfg):
        prov.update({"config_hash": config_hash(cfg), "run_key_before_issue_27": old})
        _write(path, json.dumps(metrics, indent=2))


def _marked(marker: Path) -> bool:
    """Whether ``marker`` says its folder was migrated to today's keys (:data:`LAYOUT`; an older marker: not yet)."""
    try:
        return json.loads(marker.read_text()).get("layout") == LAYOUT
    except (OSError, ValueError, AttributeError):
        return False


def plan_migration(runs_dir: Path) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """``(current name -> (old key, key of today), unmatched names)`` of the run folders under ``runs_dir``: a folder is
    matched when its name is the old or the new key of the config it holds (a branch: today's key over its
    start, or a key over the old or new key of a plain run there as its parent), on its recorded dataset
    fingerprint or the data's now."""
    folders = sorted(p for p in Path(runs_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    prints: dict[str, str] = {}

    def fingerprints(folder: Path, cfg: Config) -> list[str]:
        data = json.dumps(to_dict(cfg.data), sort_keys=True)
        if data not in prints:
            prints[data] = dataset_fingerprint(cfg.data)
        return list(dict.fromkeys(p for p in (_recorded_fingerprint(folder), prints[data]) if p))

    cfgs = {f.name: (f, _stored_config(f)) for f in folders}
    target: dict[str, tuple[str, str]] = {}
    parents: list[tuple[str, str, Config]] = []  # (old key, new key, config) of every plain run
    rest: list[str] = []
    for name, (folder, cfg) in cfgs.items():
        if cfg is None:
            rest.append(name)
            continue
        for fp in fingerprints(folder, cfg):
            old, new = flat_run_key(cfg, fp), run_key(cfg, fp)
            if name in (old, new):
                target[name] = (old, new)
                parents.append((old, new, cfg))
                break
        else:
            rest.append(name)
    unmatched = []
    for name in rest:
        folder, cfg = cfgs[name]
        found = False
        if cfg is not None:
            at = cfg.semi.burn_in
            for fp in fingerprints(folder, cfg):
                old, new = flat_run_key(cfg, fp), run_key(cfg, fp)
                today = branch_key(new, start_key(cfg, fp, at), at)
                if name == today:
                    target[name], found = (today, today), True
                    break
                for p_old, p_new, p_cfg in parents:
                    b_old, b_new = branch_key(old, p_old, at), branch_key(new, p_new, at)
                    if name in (b_old, b_new) and supervised_part(cfg, at) == supervised_part(p_cfg, at):
                        target[name], found = (b_old, today), True
                        break
                if found:
                    break
        if not found:
            unmatched.append(name)
    return target, unmatched


def migrate(runs_dir: str | Path, log: Callable[[str], None] = lambda m: None, force: bool = False) -> dict[str, str]:
    """Rename the run folders under ``runs_dir`` (``OUT/runs``) from the keys before issue 27 to today's
    (module docstring); returns ``{old name: new name}`` of the folders renamed now. Skipped when
    ``runs_dir/.run-keys`` says it was done, unless ``force``."""
    runs_dir = Path(runs_dir)
    marker = runs_dir / MARKER
    if not runs_dir.is_dir() or (_marked(marker) and not force):
        return {}
    target, unmatched = plan_migration(runs_dir)
    moved: dict[str, str] = {}
    pending = []
    for name, (old, new) in target.items():
        src, dst = runs_dir / name, runs_dir / new
        if name != new:
            if dst.exists():
                pending.append(f"{name} (its new folder {new} exists already: remove one of them)")
                continue
            lock = RunLock(src)
            if not lock.try_acquire():
                pending.append(f"{name} (in use by PID {lock.holder()})")
                continue
            try:
                os.rename(src, dst)
            finally:
                lock.release()
            moved[name] = new
        cfg = _stored_config(dst)
        if cfg is not None:
            _point_records(dst, cfg, old)
    if moved:
        log(f"{len(moved)} run folders in {runs_dir} renamed to today's run keys (issue 27's config layout, issue 25's "
            "branch starts)")
    for item in pending:
        log(f"not renamed yet: {item}")
    if unmatched:
        log(f"{len(unmatched)} folders in {runs_dir} hold no run of a known key (other data, or no config): left alone")
    if not pending:
        _write(marker, json.dumps({"layout": LAYOUT, "unmatched": unmatched}, indent=2) + "\n")
    return moved
