"""Fuzz: corrupt image files and mangled COCO json text end in a one-line DatasetError or a reported skip.

Extends the structural json fuzz of test_coco.py to the bytes: of the image files (truncated,
flipped, spliced, replaced) in a labeled json or an unlabeled folder, and of the json text
(truncation, byte flips, BOMs, NaN/1e999, deep nesting, odd widths). Any other exception fails.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from dtg.data.coco import DatasetError, load_image, load_labeled, load_unlabeled


def _image_bytes(fmt: str) -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format=fmt)
    return buf.getvalue()


_VALID = {"png": _image_bytes("PNG"), "jpg": _image_bytes("JPEG")}


@st.composite
def _corrupted(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid 40x30 PNG or JPEG with 1-3 of: truncation, byte flips, inserted or deleted runs, garbage."""
    ext = draw(st.sampled_from(sorted(_VALID)))
    data = bytearray(_VALID[ext])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "flip", "flip", "truncate", "insert", "delete", "garbage"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            data = bytearray(draw(st.binary(max_size=64)))
    return ext, bytes(data)


def _coco(ext: str) -> dict:
    images = [{"id": i, "file_name": f"{i}.{ext}", "width": 40, "height": 30} for i in (1, 2)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 3, 10, 12]} for i in (1, 2)]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}


def _one_line_naming(e: DatasetError, path: Path) -> None:
    assert "\n" not in str(e) and str(path) in str(e), str(e)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=_corrupted(), skip_bad=st.booleans(), as_folder=st.booleans())
def test_fuzz_corrupt_image_files_error_or_skip_cleanly(tmp_path: Path, image: tuple[str, bytes], skip_bad: bool, as_folder: bool) -> None:
    ext, data = image
    folder = tmp_path / f"imgs_{ext}"
    folder.mkdir(exist_ok=True)
    (folder / f"1.{ext}").write_bytes(_VALID[ext])
    (folder / f"2.{ext}").write_bytes(data)
    src = folder if as_folder else tmp_path / f"{ext}.json"
    if not as_folder:
        src.write_text(json.dumps(_coco(ext)))
    lines: list[str] = []
    try:
        loaded = (load_unlabeled(src, log=lines.append, skip_bad=skip_bad) if as_folder
                  else load_labeled(src, folder, log=lines.append, skip_bad=skip_bad))
    except DatasetError as e:
        _one_line_naming(e, src)
        assert not skip_bad and any("image 2 " in line for line in lines)
        event("error")
        return
    ids = [r.id for r in loaded.records]
    event("skipped" if ids == [1] else "loaded")
    if ids == [1]:  # skipped, and reported
        assert skip_bad and any("image 2 " in line for line in lines) and "skipped 1 images" in lines[-1]
    else:  # the corruption left a readable image of the declared size; training decodes it or fails cleanly
        assert ids == [1, 2] and not lines
        try:
            rec = loaded.records[1]
            assert load_image(rec.path).size == (rec.width, rec.height)
        except DatasetError as e:
            _one_line_naming(e, loaded.records[1].path)
            event("loaded, then fails to decode")


_VALID_JSON = json.dumps(_coco("png")).encode()


@st.composite
def _mangled_json(draw: st.DrawFn) -> bytes:
    """The bytes of a valid COCO json, truncated, flipped, spliced with garbage, or deeply nested."""
    data = bytearray(_VALID_JSON)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "nest", "number"]))
        at = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from([b"\xff\xfe", b"\xef\xbb\xbf", b"NaN", b"1e999", b"-", b'"', b",", b"}", b"\x00"]))
        elif op == "nest":
            depth = draw(st.sampled_from([10, 5000, 200_000]))
            data = bytearray(b'{"images": ' + b"[" * depth + b"]" * depth + b', "categories": []}')
        else:
            data = bytearray(_VALID_JSON.replace(b'"width": 40', b'"width": ' + str(draw(st.sampled_from(
                ["1e400", "-1", "40.0", "40.5", "true", "null", "[]", str(10**30)]))).encode()))
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_mangled_json(), skip_bad=st.booleans(), labeled=st.booleans())
def test_fuzz_mangled_json_text_errors_cleanly(tmp_path: Path, text: bytes, skip_bad: bool, labeled: bool) -> None:
    folder = tmp_path / "images"
    if not folder.exists():
        folder.mkdir()
        for i in (1, 2):
            (folder / f"{i}.png").write_bytes(_VALID["png"])
    path = tmp_path / "mangled.json"
    path.write_bytes(text)
    load = load_labeled if labeled else load_unlabeled
    try:
        src = load(path, folder, skip_bad=skip_bad, log=lambda s: None)
    except DatasetError as e:
        _one_line_naming(e, path)
        event("error")
        return
    event(f"loaded {len(src.records)} images")
    for r in src.records:
        assert r.path.parent == folder and r.boxes.shape == (len(r.category_ids), 4) and np.isfinite(r.boxes).all()
