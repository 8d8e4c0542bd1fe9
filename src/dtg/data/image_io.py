"""Image file I/O for the COCO sources: decoding, integrity probing and file checks.

:func:`load_image` decodes any PIL-readable file as RGB, as displayed (EXIF orientation
applied, alpha composited over :data:`ALPHA_BACKGROUND`). :func:`probe_image` is the
validator's cheap integrity check returning a file's displayed size, and
:func:`check_image_files` applies it to the image entries of a COCO json. Also holds
:class:`DatasetError` and the one-line message helpers, shared with (and re-exported
by) :mod:`dtg.data.coco`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

ALPHA_BACKGROUND = (128, 128, 128)  # transparent pixels are composited over mid-gray


class DatasetError(ValueError):
    """A dataset cannot be used; the message is one line naming the file."""


class BadImage(Exception):
    """Internal: one problem with one file, carrying the reason text."""


# ----------------------------------------------------------------------------- messages


def _one_line(text: Any, limit: int = 160) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def show_value(value: Any, limit: int = 60) -> str:
    """A short one-line rendering of a json value (NaN shown as NaN, strings quoted)."""
    try:
        s = json.dumps(value, default=str)
    except (TypeError, ValueError):
        s = repr(value)
    return _one_line(s, limit)


def file_label(file_name: Any) -> str:
    return file_name if isinstance(file_name, str) and file_name.isprintable() and len(file_name) < 80 else show_value(file_name)


def error_reason(e: BaseException) -> str:
    if isinstance(e, Image.UnidentifiedImageError):
        return "not a recognised image format"
    return _one_line(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, 100)


# ----------------------------------------------------------------------------- image files


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8 (1 when absent or unreadable)."""
    try:
        o = im.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return o if o in (1, 2, 3, 4, 5, 6, 7, 8) else 1


def probe_image(path: Path) -> tuple[int, int, bool]:
    """Displayed ``(width, height)`` of an image file and whether EXIF swaps its sides, after a cheap integrity check.

    PNG: header + CRC check of every chunk; JPEG: reduced-size decode (reads all entropy
    data, so truncation is caught); other formats: full decode. Raises ``BadImage``.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except IsADirectoryError:
        raise BadImage("is a directory, not an image file") from None
    except (OSError, ValueError) as e:
        raise BadImage(f"file cannot be read ({error_reason(e)})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h, fmt = im.width, im.height, im.format
            if fmt == "PNG":
                im.verify()
                orient = 1
            else:
                orient = _orientation(im)
                if fmt == "JPEG":
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
        if fmt == "PNG" and (b"eXIf" in data or b"Raw profile type exif" in data):
            with Image.open(io.BytesIO(data)) as im:  # EXIF may sit after the image data
                im.load()
                orient = _orientation(im)
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadImage(f"cannot be decoded ({error_reason(e)})") from None
    return (h, w, True) if orient in (5, 6, 7, 8) else (w, h, False)


def _gray_to_8bit(im: Image.Image) -> Image.Image:
    """16-bit (I;16*) scaled by 1/257; I: as 8-bit if max <= 255 else as 16-bit; F: [0,1] x255, else clipped."""
    a = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16"):
        a = a / 257.0
    elif im.mode == "I":
        a = a / 257.0 if a.size and a.max() > 255 else a
    elif a.size and a.min() >= 0.0 and a.max() <= 1.0:  # F
        a = a * 255.0
    a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; alpha (RGBA/LA/PA, P or L with transparency) composited over mid-gray."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _gray_to_8bit(im)
    has_alpha = im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode an image as RGB, as displayed (EXIF orientation applied). Raises :class:`DatasetError`."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            try:
                im2 = ImageOps.exif_transpose(im)
            except Exception:  # unreadable EXIF: keep the stored orientation (as the validator does)
                im2 = im
            return to_rgb(im2)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except Exception as e:
        raise DatasetError(f"{path}: cannot decode image ({error_reason(e)})") from None


# ----------------------------------------------------------------------------- checking listed files


@dataclass
class ImageEntry:
    id: int
    file_name: str
    width: int | None
    height: int | None
    ok: bool = True


def check_image_files(imgs: dict[int, ImageEntry], image_dir: Path, problems: list[str], prefix: str, check: bool) -> None:
    """Open each usable image; mark missing/corrupt files and declared sizes that differ from the file."""
    for img in imgs.values():
        if not img.ok:
            continue
        label = f"{prefix}image {img.id} ({file_label(img.file_name)})"
        if not check:
            if img.width is None or img.height is None:
                problems.append(f"{label}: width/height missing (and file checks are off)")
                img.ok = False
            continue
        try:
            w, h, rotated = probe_image(image_dir / img.file_name)
        except BadImage as e:
            where = f" in {image_dir}" if str(e) == "file not found" else ""
            problems.append(f"{label}: {e}{where}")
            img.ok = False
            continue
        if img.width is None or img.height is None:
            img.width, img.height = w, h
        elif (img.width, img.height) != (w, h):
            hint = "; the file has an EXIF rotation and COCO sizes are after rotation" if rotated and (img.width, img.height) == (h, w) else ""
            problems.append(f"{label}: declared size {img.width}x{img.height} does not match the file ({w}x{h} as displayed{hint})")
            img.ok = False
