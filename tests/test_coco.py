"""COCO source validation and image loading (tiny files written to tmp_path)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dtg.data.coco import DatasetError, load_image, load_labeled, load_unlabeled


def _coco(n: int = 3) -> dict:
    """A valid COCO dict: n 40x30 images, two categories, two boxes per image."""
    images = [{"id": i, "file_name": f"{i:03d}.png", "width": 40, "height": 30} for i in range(1, n + 1)]
    anns = []
    for img in images:
        for k, (box, cat) in enumerate((([2, 3, 10, 12], 1), ([20, 10, 19.5, 20], 7))):
            anns.append({"id": img["id"] * 10 + k, "image_id": img["id"], "category_id": cat, "bbox": box, "iscrowd": 0, "area": 1.0})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]}


def _write(tmp: Path, data: dict | str, images: int = 4) -> tuple[Path, Path]:
    """Write ``data`` as train.json and ``images`` valid 40x30 files 001.png... into ``tmp/images``."""
    img_dir = tmp / "images"
    img_dir.mkdir(exist_ok=True)
    for i in range(1, images + 1):
        Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(img_dir / f"{i:03d}.png")
    path = tmp / "train.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path, img_dir


def _fails(tmp: Path, data: dict | str, expected: str) -> list[str]:
    """Loading raises one one-line DatasetError naming the json and mentioning ``expected``; returns the log."""
    path, img_dir = _write(tmp, data)
    lines: list[str] = []
    with pytest.raises(DatasetError) as info:
        load_labeled(path, img_dir, log=lines.append)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and expected in msg, msg
    return lines


def test_valid_roundtrip_xywh_to_xyxy(tmp_path: Path) -> None:
    lines: list[str] = []
    src = load_labeled(*_write(tmp_path, _coco()), log=lines.append)
    assert lines == [] and [r.id for r in src.records] == [1, 2, 3]
    assert src.categories == [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]
    r = src.records[0]
    assert (r.width, r.height, r.path) == (40, 30, tmp_path / "images" / "001.png")
    assert r.boxes.dtype == np.float32 and r.category_ids.dtype == np.int64
    np.testing.assert_allclose(r.boxes, [[2, 3, 12, 15], [20, 10, 39.5, 30]])
    assert r.category_ids.tolist() == [1, 7]


def test_malformed_json(tmp_path: Path) -> None:
    _fails(tmp_path, '{"images": [', "not valid JSON")


def test_malformed_json_not_fixed_by_skip_bad(tmp_path: Path) -> None:
    path, img_dir = _write(tmp_path, "[1, 2]")
    with pytest.raises(DatasetError, match="top level is a list"):
        load_labeled(path, img_dir, skip_bad=True, log=lambda s: None)


def test_missing_keys(tmp_path: Path) -> None:
    data = _coco()
    del data["categories"]
    _fails(tmp_path, data, "missing key 'categories'")


def test_wrong_type_of_list(tmp_path: Path) -> None:
    data = _coco()
    data["images"] = {"id": 1}
    _fails(tmp_path, data, "'images' must be a list")


def test_duplicate_image_ids(tmp_path: Path) -> None:
    data = _coco()
    data["images"].append({"id": 2, "file_name": "dup.png", "width": 40, "height": 30})
    lines = _fails(tmp_path, data, "image 2 (dup.png): duplicate image id")
    assert len(lines) == 1


def test_duplicate_category_ids(tmp_path: Path) -> None:
    data = _coco()
    data["categories"].append({"id": 7, "name": "again"})
    _fails(tmp_path, data, "category 7: duplicate category id")


def test_missing_file(tmp_path: Path) -> None:
    path, img_dir = _write(tmp_path, _coco())
    (img_dir / "002.png").unlink()
    with pytest.raises(DatasetError) as info:
        load_labeled(path, img_dir, log=lambda s: None)
    assert f"{path}: image 2 (002.png): file not found in {img_dir}" in str(info.value)


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_file(tmp_path: Path, kind: str) -> None:
    path, img_dir = _write(tmp_path, _coco())
    f = img_dir / "003.png"
    f.write_bytes(f.read_bytes()[:-20] if kind == "truncated" else b"not an image at all")
    with pytest.raises(DatasetError) as info:
        load_labeled(path, img_dir, log=lambda s: None)
    assert "image 3 (003.png): cannot be decoded" in str(info.value) and "\n" not in str(info.value)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _coco(1)
    data["images"][0]["file_name"] = "001.jpg"
    path, img_dir = _write(tmp_path, data)
    noise = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(img_dir / "001.jpg", quality=95)
    f = img_dir / "001.jpg"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"image 1 \(001.jpg\): cannot be decoded"):
        load_labeled(path, img_dir, log=lambda s: None)
    with pytest.raises(DatasetError, match="001.jpg: cannot decode image"):
        load_image(f)


def test_size_mismatch(tmp_path: Path) -> None:
    data = _coco()
    path, img_dir = _write(tmp_path, data)
    data["images"][0]["width"] = 41
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"image 1 \(001.png\): declared size 41x30 does not match the file \(40x30"):
        load_labeled(path, img_dir, log=lambda s: None)


def test_undeclared_category(tmp_path: Path) -> None:
    data = _coco()
    data["annotations"][3]["category_id"] = 5
    _fails(tmp_path, data, "annotation 21 (image 2): category 5 is not declared")


def test_non_positive_box(tmp_path: Path) -> None:
    data = _coco()
    data["annotations"][0]["bbox"] = [10, 5, 0, 8]
    _fails(tmp_path, data, "annotation 10 (image 1): box [10, 5, 0, 8] has non-positive width")


def test_box_outside_image(tmp_path: Path) -> None:
    data = _coco()
    data["annotations"][1]["bbox"] = [20, 10, 21.5, 20]  # x2 = 41.5 > 40 + 1
    _fails(tmp_path, data, "annotation 11 (image 1): box [20, 10, 21.5, 20] lies outside the 40x30 image")


def test_box_within_tolerance_is_clipped(tmp_path: Path) -> None:
    data = _coco(1)
    data["annotations"][0]["bbox"] = [-0.5, -1, 40.5, 31]
    src = load_labeled(*_write(tmp_path, data), log=lambda s: None)
    np.testing.assert_allclose(src.records[0].boxes[0], [0, 0, 40, 30])


def test_non_finite_box(tmp_path: Path) -> None:
    data = json.dumps(_coco()).replace("[2, 3, 10, 12]", "[2, NaN, 10, 12]", 1)
    path, img_dir = _write(tmp_path, _coco())
    path.write_text(data)
    with pytest.raises(DatasetError, match=r"annotation 10 \(image 1\): box \[2, NaN, 10, 12\] has non-finite"):
        load_labeled(path, img_dir, log=lambda s: None)


def test_annotation_for_unknown_image(tmp_path: Path) -> None:
    data = _coco()
    data["annotations"][0]["image_id"] = 99
    _fails(tmp_path, data, "annotation 10: image_id 99 is not a declared image")


def test_all_problems_logged_before_raising(tmp_path: Path) -> None:
    data = _coco()
    data["annotations"][0]["image_id"] = 99
    data["annotations"][2]["bbox"] = [1, 2, 3]
    data["images"][2]["height"] = -4
    lines = _fails(tmp_path, data, "3 problems found (first: ")
    assert len(lines) == 3 and all(line.startswith(str(tmp_path / "train.json") + ": ") for line in lines)
    assert "rerun with --skip-bad" not in "".join(lines)


def test_skip_bad_drops_exactly_the_bad_items(tmp_path: Path) -> None:
    data = _coco(4)
    data["annotations"][0]["bbox"] = [10, 5, -1, 8]  # image 1 keeps its other box
    data["annotations"][2]["category_id"] = 3  # image 2 keeps its other box
    data["annotations"][5]["iscrowd"] = 1  # image 3: crowd, kept out, not a problem
    path, img_dir = _write(tmp_path, data)
    (img_dir / "004.png").unlink()  # image 4 dropped with its 2 boxes
    lines: list[str] = []
    src = load_labeled(path, img_dir, skip_bad=True, log=lines.append)
    assert [r.id for r in src.records] == [1, 2, 3]
    assert [len(r.boxes) for r in src.records] == [1, 1, 1]
    assert (src.num_skipped_images, src.num_skipped_boxes, src.num_crowd) == (1, 2, 1)
    assert sum("not found" in s or "non-positive" in s or "not declared" in s for s in lines) == 3
    assert f"skipped 1 images and 2 boxes from {path} (plus 2 valid boxes on the skipped images)" in lines
    assert any("1 crowd annotations" in s for s in lines)


def test_images_without_annotations_are_kept(tmp_path: Path) -> None:
    data = _coco(2)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 1]
    src = load_labeled(*_write(tmp_path, data), log=lambda s: None)
    assert [r.id for r in src.records] == [1, 2] and src.records[1].boxes.shape == (0, 4)


def test_unlabeled_json_without_annotations(tmp_path: Path) -> None:
    data = _coco(2)
    del data["annotations"], data["categories"]
    del data["images"][1]["width"], data["images"][1]["height"]  # read from the header
    path, img_dir = _write(tmp_path, data)
    src = load_unlabeled(path, img_dir, log=lambda s: None)
    assert [(r.id, r.width, r.height, len(r.boxes)) for r in src.records] == [(1, 40, 30, 0), (2, 40, 30, 0)]


def test_unlabeled_folder(tmp_path: Path) -> None:
    folder = tmp_path / "unl"
    folder.mkdir()
    Image.new("RGB", (17, 9)).save(folder / "b.PNG")
    Image.new("L", (5, 8)).save(folder / "a.jpg")
    (folder / "notes.txt").write_text("ignored")
    src = load_unlabeled(folder, log=lambda s: None)
    assert src.json_path is None and src.image_dir == folder
    assert [(r.id, r.path.name, r.width, r.height) for r in src.records] == [(1, "a.jpg", 5, 8), (2, "b.PNG", 17, 9)]


def test_unlabeled_folder_bad_file(tmp_path: Path) -> None:
    folder = tmp_path / "unl"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"\xff\xd8junk")
    with pytest.raises(DatasetError, match=r"image 2 \(b.jpg\): cannot be decoded"):
        load_unlabeled(folder, log=lambda s: None)
    lines: list[str] = []
    src = load_unlabeled(folder, skip_bad=True, log=lines.append)
    assert [r.path.name for r in src.records] == ["a.png"] and f"skipped 1 images and 0 boxes from {folder}" in lines


# ----------------------------------------------------------------------------- image modes


def _rgb_at(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def test_load_grayscale_and_16bit(tmp_path: Path) -> None:
    Image.new("L", (6, 4), 77).save(tmp_path / "g.png")
    a16 = np.full((4, 6), 65535, dtype=np.uint16)
    a16[0, 0] = 0
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert _rgb_at(load_image(tmp_path / "g.png"), (1, 1)) == (77, 77, 77)
    img = load_image(tmp_path / "g16.png")
    assert img.size == (6, 4) and _rgb_at(img, (0, 0)) == (0, 0, 0) and _rgb_at(img, (5, 3)) == (255, 255, 255)


def test_load_rgba_composites_over_gray(tmp_path: Path) -> None:
    a = np.zeros((4, 6, 4), dtype=np.uint8)
    a[..., 0] = 255
    a[0, 0, 3] = 255  # opaque red; everything else fully transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert _rgb_at(img, (0, 0)) == (255, 0, 0) and _rgb_at(img, (3, 2)) == (128, 128, 128)


def test_load_palette_with_transparency(tmp_path: Path) -> None:
    p = Image.new("P", (6, 4), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((5, 3), 1)
    p.save(tmp_path / "p.png", transparency=0)
    img = load_image(tmp_path / "p.png")
    assert _rgb_at(img, (5, 3)) == (0, 255, 0) and _rgb_at(img, (0, 0)) == (128, 128, 128)


def test_load_cmyk(tmp_path: Path) -> None:
    Image.new("CMYK", (6, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((2, 2))
    assert r > 200 and g < 50 and b < 50


def test_exif_rotated_jpeg(tmp_path: Path) -> None:
    """Stored 40x20 with a red top-left corner; Orientation=6 displays it rotated 90 deg clockwise."""
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:5, :5] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif, quality=100)
    img = load_image(tmp_path / "r.jpg")
    assert img.size == (20, 40)
    r, g, b = img.getpixel((17, 2))  # stored top-left -> displayed top-right
    assert r > 200 and g < 60 and b < 60
    assert max(img.getpixel((2, 2))) < 60
    data = {"images": [{"id": 1, "file_name": "r.jpg", "width": 20, "height": 40}], "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 40]}]}
    (tmp_path / "r.json").write_text(json.dumps(data))
    assert load_labeled(tmp_path / "r.json", tmp_path, log=lambda s: None).records[0].width == 20
    data["images"][0].update(width=40, height=20)  # stored size: wrong for COCO
    (tmp_path / "r.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="has an EXIF rotation and COCO sizes are after rotation"):
        load_labeled(tmp_path / "r.json", tmp_path, log=lambda s: None)


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"junk")
    for p in (tmp_path / "x.png", tmp_path / "missing.png"):
        with pytest.raises(DatasetError) as info:
            load_image(p)
        assert str(p) in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- fuzz

_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(-5, 50), max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def _mutated(draw: st.DrawFn) -> dict:
    data = _coco(2)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_VALUES)
    return data


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_mutated(), skip_bad=st.booleans(), labeled=st.booleans())
def test_fuzz_mutations_error_cleanly(tmp_path: Path, data: dict, skip_bad: bool, labeled: bool) -> None:
    img_dir = tmp_path / "images"
    if not img_dir.exists():
        _write(tmp_path, _coco(2))
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(copy.deepcopy(data)))
    try:
        if labeled:
            src = load_labeled(path, img_dir, skip_bad=skip_bad, log=lambda s: None)
        else:
            src = load_unlabeled(path, img_dir, skip_bad=skip_bad, log=lambda s: None)
    except DatasetError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    for r in src.records:
        assert r.boxes.shape == (len(r.category_ids), 4) and np.isfinite(r.boxes).all()
