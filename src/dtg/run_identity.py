"""A run's identity and provenance: what makes two runs the same run, and what a run ran on.

* Identity: :func:`config_hash` of the resolved config in today's layout (without the keys that
  cannot change what a run learns, :data:`VOLATILE_KEYS`, and those at their neutral value,
  :data:`NEUTRAL`) plus the dataset fingerprint, so that a cached run
  is reused only for the same config on the same data (:func:`run_key`, :func:`training_key`,
  :func:`branch_key` over :func:`start_key`).
* Provenance: :func:`provenance` records what a run ran on (git commit and dirty flag of the
  source tree, dataset fingerprint, library versions, threads, CPU); the trainer writes it
  into ``metrics.json``.

No subprocesses of training and no threads here: :mod:`dtg.run_exec` executes runs. The
training engine imports this module only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable

from dtg.config import Config, DataConfig, neutral_values, to_dict
from dtg.data.coco import IMAGE_EXTENSIONS
from dtg.fingerprint import files_fingerprint

# Keys that cannot change what a run learns; left out of the run hash. eval_period is not
# among them: it decides the AP curve and best.pth of a run (not its final weights).
VOLATILE_KEYS = ("output_dir", "threads", "log_period", "checkpoint_period", "checkpoint_at", "target_images")


def _without(data: dict[str, Any], keys: Iterable[str]) -> None:
    """Remove dotted ``keys`` from the nested dict ``data`` in place (missing ones are fine)."""
    for key in keys:
        *path, last = key.split(".")
        node: Any = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)


def _get(data: dict[str, Any], key: str, default: Any = None) -> Any:
    """The value at the dotted ``key`` of the nested dict ``data`` (``default`` when missing)."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


# Keys added after runs were cached, with the value that keeps the behaviour from before they existed
# (declared in the schema: Annotated[..., Neutral(value)]): at that value they are left out of the hash.
NEUTRAL: dict[str, Any] = json.loads(json.dumps(neutral_values()))
_MISSING = object()

# Methods whose training never reads dtg.*: their dtg section is left out of the hash, so that a change
# of DTG's defaults, or a dtg.* override, leaves their runs' identity alone. (Their logged target-quality
# figures, targets/*dtg*, do read dtg.*: evaluation only, like eval_period.)
DTG_BLIND_METHODS = ("supervised", "sparse", "oracle")


def hashed_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as hashed, in today's layout (:func:`dtg.config.to_dict`): without
    :data:`VOLATILE_KEYS`, without the keys at their :data:`NEUTRAL` value (so that adding a key with a
    neutral default changes no run key), and for :data:`DTG_BLIND_METHODS` without the ``dtg`` section."""
    data = json.loads(json.dumps(to_dict(cfg)))
    if cfg.method in DTG_BLIND_METHODS:
        data.pop("dtg")
    _without(data, VOLATILE_KEYS)
    _without(data, [k for k, v in NEUTRAL.items() if _get(data, k, _MISSING) == v])
    return _pruned(data)


def _pruned(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the sections left empty (a section added later whose keys are all neutral)."""
    out = {k: _pruned(v) if isinstance(v, dict) else v for k, v in data.items()}
    return {k: v for k, v in out.items() if v != {}}


def config_hash(cfg: Config) -> str:
    """12 hex digits of :func:`hashed_dict`."""
    return hashlib.sha1(json.dumps(hashed_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def run_key(cfg: Config, fingerprint: str) -> str:
    """A run's identity: 12 hex digits of its :func:`config_hash` and its dataset fingerprint.

    A supervised run is identified by the keys it reads only (:func:`supervised_part`), so that
    configs that differ in a semi-supervised key share their supervised run.
    """
    if cfg.method == "supervised":
        part = hashlib.sha1(json.dumps(supervised_part(cfg), sort_keys=True).encode()).hexdigest()[:12]
        return hashlib.sha1(f"supervised:{part}:{fingerprint}".encode()).hexdigest()[:12]
    return hashlib.sha1(f"{config_hash(cfg)}:{fingerprint}".encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- fingerprints


def _images_of(json_path: Path, image_dir: Path) -> list[Path]:
    try:
        data = json.loads(json_path.read_text())
        names = [im["file_name"] for im in data.get("images", []) if isinstance(im, dict) and "file_name" in im]
    except (OSError, ValueError, TypeError):
        return []
    return [image_dir / n for n in names if (image_dir / n).is_file()]


def dataset_fingerprint(d: DataConfig, with_unlabeled: bool = True) -> str:
    """Fingerprint of what a run reads: the json files and the bytes of every image they name.

    The labeled json, the unlabeled json (or every image of the unlabeled folder), the val
    json and the full json, with their images. Missing files are left out (the run itself
    reports them).
    """
    pairs = [(d.train_json, d.train_images)] + ([(d.unlabeled, d.unlabeled_images)] if with_unlabeled else [])
    pairs += [(d.val_json, d.val_images)] if d.val_json else []
    pairs += [(d.full_json, d.train_images)] if d.full_json else []
    return _fingerprint(pairs)


def val_fingerprint(d: DataConfig) -> str:
    """Fingerprint of the evaluation set alone (val json and its images); "-" without one."""
    return _fingerprint([(d.val_json, d.val_images)]) if d.val_json else "-"


def _fingerprint(pairs: list[tuple[str, str]]) -> str:
    """16 hex digits over the (json or image folder, image folder) pairs' files."""
    jsons: list[Path] = []
    images: set[Path] = set()
    for src, folder in pairs:
        src_p, folder_p = Path(src), Path(folder)
        if src_p.is_dir():
            images.update(p for p in src_p.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif src_p.is_file():
            jsons.append(src_p)
            images.update(_images_of(src_p, folder_p))
    h = hashlib.sha256()
    h.update(files_fingerprint(jsons).encode())
    h.update(files_fingerprint(images).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- provenance


def git_state(path: Path) -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the git checkout holding ``path``; ``("unknown", None)`` outside one."""
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, bool(status.strip())


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "Pillow", "faster-coco-eval", "dtg"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance(cfg: Config, threads: int, fingerprint: str) -> dict[str, Any]:
    """What a run ran on, for its ``metrics.json`` (``threads``: torch's intra-op threads)."""
    commit, dirty = git_state(Path(__file__).resolve().parent)
    return {
        "commit": commit, "dirty": dirty, "dataset_fingerprint": fingerprint,
        "val_fingerprint": val_fingerprint(cfg.data), "versions": library_versions(),
        "threads": threads, "cpu": cpu_name(), "cpu_capability": cpu_capability(), "cores": _cores(),
        "cpu_kernels": {"MKL_CBWR": os.environ.get("MKL_CBWR", ""), "onednn": _onednn_enabled()},
        "config_hash": config_hash(cfg),
    }


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to here (``AVX512``, ``AVX2``, ...; env ``ATEN_CPU_CAPABILITY``).

    Kernels of different ISAs round differently, and 1000 training steps amplify that into
    different weights: runs agree bit for bit only on the same capability and thread count.
    """
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def _onednn_enabled() -> bool:
    import torch

    return bool(torch.backends.mkldnn.enabled)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ----------------------------------------------------------------------------- a run's files


def iteration_checkpoint(iteration: int) -> str:
    """The file name under ``checkpoints/`` of the checkpoint kept at ``iteration`` (config ``checkpoint_at``)."""
    return f"iter_{iteration:07d}.pth"


# What a supervised run never reads: a semi-supervised config that differs from a supervised one
# only here trains exactly like it until its burn-in ends (semi.ema_momentum is read: the teacher).
SUPERVISED_IGNORES = ("method", "checkpoint_at", "dtg", "semi", "sparse", "data.batch_unlabeled",
                      "data.weak_view", "data.strong_view")
SUPERVISED_READS = ("semi.ema_momentum",)


def supervised_part(cfg: Config, until: int | None = None) -> dict[str, Any]:
    """``cfg`` as a plain dict without the keys a supervised run does not read (:data:`SUPERVISED_IGNORES`)
    or that never change what it learns (:data:`VOLATILE_KEYS`).

    With ``until``, only what decides its first ``until`` iterations: ``solver.max_iter``, the
    learning-rate steps at or after ``until`` and ``eval_period`` are left out too.
    """
    full = json.loads(json.dumps(to_dict(cfg)))
    kept = {key: _get(full, key) for key in SUPERVISED_READS}
    data = hashed_dict(cfg)
    _without(data, SUPERVISED_IGNORES)
    if until is not None:
        data["solver"].pop("max_iter")
        data["solver"]["steps"] = [s for s in data["solver"]["steps"] if s < until]
        data.pop("eval_period")
    return {**data, "reads": kept}


# What a supervised run reads only to evaluate itself (val set, curve points) or not at all
# (the unlabeled data, the ceiling's json): two runs that differ only here train the same weights.
EVALUATION_ONLY = ("data.val_json", "data.val_images", "data.unlabeled", "data.unlabeled_images", "data.full_json",
                   "eval_period")


def training_key(cfg: Config) -> str | None:
    """The identity of a supervised run's *training* (its weights), or None for other methods: its
    :func:`supervised_part` without :data:`EVALUATION_ONLY`, and the labeled data's fingerprint."""
    if cfg.method != "supervised":
        return None
    data = supervised_part(cfg)
    _without(data, EVALUATION_ONLY)
    labeled = _fingerprint([(cfg.data.train_json, cfg.data.train_images)])
    return hashlib.sha1(f"{json.dumps(data, sort_keys=True)}:{labeled}".encode()).hexdigest()[:12]


def run_difference(held: Config, new: Config) -> str | None:
    """Why ``new`` is another run than ``held`` (``"KEY: A there, B here"``, the first differing key in
    config order), or None when it is the same run (the same :func:`run_key` on the same data).

    Compared in the current layout without :data:`VOLATILE_KEYS`; two supervised configs without
    the keys a supervised run does not read (:data:`SUPERVISED_IGNORES`), as :func:`run_key` does.
    """
    both_supervised = held.method == new.method == "supervised"

    def view(cfg: Config) -> dict[str, Any]:
        data = json.loads(json.dumps(to_dict(cfg)))
        _without(data, VOLATILE_KEYS)
        if both_supervised:
            reads = {key.split(".")[1]: _get(data, key) for key in SUPERVISED_READS}
            _without(data, SUPERVISED_IGNORES)
            data["semi"] = reads
        return data

    def first(a: Any, b: Any, key: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in [*a, *(k for k in b if k not in a)]:
                found = first(a.get(k), b.get(k), f"{key}.{k}" if key else k)
                if found:
                    return found
            return None
        show = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
        return None if a == b else f"{key}: {show(a)} there, {show(b)} here"

    return first(view(held), view(new), "")


def start_key(cfg: Config, fingerprint: str, iteration: int) -> str:
    """The identity of the weights a supervised run of ``cfg`` holds after its first ``iteration`` iterations on the
    data of ``fingerprint``: what decides them (:func:`supervised_part` with ``until``), not how long the run goes on
    after them, so that a supervised run of 2000 iterations and one of 3000 with the same first ``iteration`` give
    one start. ``cfg`` may be the branch's own config: a branch starts only where its supervised part is the parent's."""
    part = hashlib.sha1(json.dumps(supervised_part(cfg, iteration), sort_keys=True).encode()).hexdigest()[:12]
    return hashlib.sha1(f"supervised:{part}@{iteration}:{fingerprint}".encode()).hexdigest()[:12]


def branch_key(key: str, start: str, iteration: int) -> str:
    """The identity of a run of key ``key`` that starts from the weights of :func:`start_key` ``start`` (a supervised
    run's checkpoint at ``iteration``) instead of training its own burn-in. (Until issue 25's schedule change,
    ``start`` was the key of the whole supervised run the checkpoint came from: :mod:`dtg.run_migration`.)"""
    return hashlib.sha1(f"{key}:from {start}@{iteration}".encode()).hexdigest()[:12]
