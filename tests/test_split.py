"""dtg split coco (docs/method.md, "Splits") and dtg split voc, on small hand-made inputs."""

import hashlib
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dtg.cli import main
from dtg.data.coco import load_labeled, load_unlabeled
from dtg.evaluation.coco_eval import evaluate_bbox
from dtg.tools.split import fold_ranking, labeled_ids, num_labeled
from dtg.tools.voc import VOC_CLASSES

# ----------------------------------------------------------------------------- COCO partial labels


def coco_json(path: Path, n: int = 50, seed: int = 0, shuffle: bool = False) -> dict:
    """n images with scattered ids, 0-3 annotations each (annotation ids scattered too)."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, 10**6), n)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48} for i in ids]
    anns, aid = [], 7
    for i in ids:
        for _ in range(rng.randint(0, 3)):
            aid += rng.randint(1, 5)
            anns.append({"id": aid, "image_id": i, "category_id": rng.choice([1, 2]), "bbox": [1.5, 2, 10, 8.25],
                         "area": 82.5, "iscrowd": 0})
    data = {"info": {"description": "tiny"}, "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    if shuffle:
        rng.shuffle(data["images"]), rng.shuffle(data["annotations"])
    path.write_text(json.dumps(data))
    return data


def run_split(ann: Path, out: Path, *extra: str) -> int:
    return main(["split", "coco", "--ann", str(ann), "--percent", "2", "10", "50", "--folds", "3", "--out", str(out), *extra])


def test_coco_split_partitions_by_image_id_with_all_annotations(tmp_path):
    data = coco_json(tmp_path / "instances_train2017.json")
    assert run_split(tmp_path / "instances_train2017.json", tmp_path / "out") == 0
    all_ids = {im["id"] for im in data["images"]}
    anns_of = {}
    for a in data["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(names) == 2 * 3 * 3 and "instances_train2017.1@10.json" in names
    assert "instances_train2017.3@2-unlabeled.json" in names
    labeled = {}
    for fold in (1, 2, 3):
        for pct, n in ((2, 1), (10, 5), (50, 25)):  # floor(50 * p / 100), at least 1
            lab = json.loads((tmp_path / "out" / f"instances_train2017.{fold}@{pct}.json").read_text())
            unl = json.loads((tmp_path / "out" / f"instances_train2017.{fold}@{pct}-unlabeled.json").read_text())
            lab_ids, unl_ids = [im["id"] for im in lab["images"]], [im["id"] for im in unl["images"]]
            assert len(lab_ids) == n and lab_ids == sorted(lab_ids) and unl_ids == sorted(unl_ids)
            assert set(lab_ids) | set(unl_ids) == all_ids and not set(lab_ids) & set(unl_ids)
            want = sorted((a for i in lab_ids for a in anns_of.get(i, [])), key=lambda a: (a["image_id"], a["id"]))
            assert lab["annotations"] == want and unl["annotations"] == []
            for d in (lab, unl):
                assert d["categories"] == data["categories"] and d["info"] == data["info"]
            labeled[fold, pct] = set(lab_ids)
    for fold in (1, 2, 3):  # one ranking per fold: the percents are nested
        assert labeled[fold, 2] <= labeled[fold, 10] <= labeled[fold, 50]
    assert labeled[1, 50] != labeled[2, 50] != labeled[3, 50]
    # dtg's own loaders accept both files
    src = load_labeled(tmp_path / "out" / "instances_train2017.2@10.json", tmp_path, check_files=False, log=lambda m: None)
    assert [r.id for r in src.records] == sorted(labeled[2, 10])
    unl = load_unlabeled(tmp_path / "out" / "instances_train2017.2@10-unlabeled.json", tmp_path, check_files=False, log=lambda m: None)
    assert len(unl.records) == 45


def test_coco_split_is_byte_identical_across_runs_and_input_order(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    coco_json(tmp_path / "a" / "instances_train2017.json", seed=3)
    coco_json(tmp_path / "b" / "instances_train2017.json", seed=3, shuffle=True)  # same content, other order
    for d in ("a", "b"):
        assert run_split(tmp_path / d / "instances_train2017.json", tmp_path / d / "out1") == 0
    assert run_split(tmp_path / "a" / "instances_train2017.json", tmp_path / "a" / "out2") == 0
    files = sorted(p.name for p in (tmp_path / "a" / "out1").iterdir())
    for name in files:
        ref = (tmp_path / "a" / "out1" / name).read_bytes()
        assert ref == (tmp_path / "a" / "out2" / name).read_bytes() == (tmp_path / "b" / "out1" / name).read_bytes(), name
    assert not [p for p in (tmp_path / "a" / "out1").iterdir() if p.name.startswith(".")], "no temporary files left"


def test_the_sample_follows_the_documented_rule_and_is_pinned():
    """The ranking is part of the protocol: these values must never change between versions."""
    ids = list(range(1, 21))
    assert labeled_ids(ids, 10, 1) == [2, 15]
    assert labeled_ids(ids, 10, 2) == [12, 16]
    assert fold_ranking(ids, 5)[:3] == [11, 20, 18]
    assert hashlib.sha256(repr(labeled_ids(list(range(1000)), 5, 3)).encode()).hexdigest()[:16] == "3725afe8023acff3"
    # the rule of the module docstring, written out independently
    some = random.Random(1).sample(range(10**7), 300)
    by_hash = sorted(some, key=lambda i: hashlib.sha256(f"dtg-coco-split/fold4/{i}".encode()).digest())
    assert labeled_ids(some, 10, 4) == sorted(by_hash[:30])
    assert num_labeled(118287, 1) == 1182 and num_labeled(118287, 0.1) == 118 and num_labeled(10, 1) == 1


@settings(max_examples=40, deadline=None)
@given(ids=st.sets(st.integers(0, 10**9), min_size=2, max_size=60), pct=st.floats(0.5, 99.0), fold=st.integers(1, 5))
def test_labeled_ids_are_a_subset_of_the_right_size_independent_of_order(ids, pct, fold):
    lst = sorted(ids)
    lab = labeled_ids(lst, pct, fold)
    assert len(lab) == num_labeled(len(lst), pct) and set(lab) <= ids and lab == sorted(set(lab))
    assert labeled_ids(list(reversed(lst)), pct, fold) == lab


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id"),
        (lambda d: d["annotations"].append({"id": 1, "image_id": -5, "bbox": [0, 0, 1, 1]}), "image_id -5 is not a declared image"),
        (lambda d: d.pop("images"), "missing key 'images'"),
    ],
)
def test_coco_split_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, mutate, message):
    data = coco_json(tmp_path / "x.json")
    mutate(data)
    (tmp_path / "x.json").write_text(json.dumps(data))
    assert run_split(tmp_path / "x.json", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.json" in err[0] and message in err[0], err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_coco_split_bad_arguments(tmp_path, capsys):
    coco_json(tmp_path / "x.json", n=3)
    assert main(["split", "coco", "--ann", str(tmp_path / "x.json"), "--percent", "100", "--out", str(tmp_path / "o")]) == 2
    assert "--percent must be in (0, 100)" in capsys.readouterr().err
    assert main(["split", "coco", "--ann", str(tmp_path / "x.json"), "--folds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--folds must be >= 1" in capsys.readouterr().err
    coco_json(tmp_path / "one.json", n=1)
    assert main(["split", "coco", "--ann", str(tmp_path / "one.json"), "--out", str(tmp_path / "o")]) == 2
    assert "one.json: 1 image(s); a split needs at least 2" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{nope")
    assert main(["split", "coco", "--ann", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


# ----------------------------------------------------------------------------- VOC


def _xml(name: str, w: int, h: int, objects: list[tuple[str, int, tuple[int, int, int, int]]]) -> str:
    objs = "".join(
        f"<object><name>{c}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for c, d, b in objects
    )
    return (f"<annotation><folder>VOC</folder><filename>{name}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>")


def make_voc(root: Path, year: int, sets: dict[str, dict[str, list]], size: tuple[int, int] = (40, 30)) -> Path:
    d = root / "VOCdevkit" / f"VOC{year}"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for split, images in sets.items():
        (d / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in images))
        for name, objects in images.items():
            Image.new("RGB", size, (90, 120, 30)).save(d / "JPEGImages" / f"{name}.jpg")
            (d / "Annotations" / f"{name}.xml").write_text(_xml(name, *size, objects))
    return d


@pytest.fixture
def voc(tmp_path):
    v07 = make_voc(tmp_path, 2007, {
        "trainval": {"000005": [("chair", 0, (5, 10, 14, 19)), ("person", 1, (1, 1, 40, 30))],
                     "000007": [("tvmonitor", 0, (2, 3, 20, 25))]},
        "test": {"000001": [("dog", 0, (3, 4, 30, 28)), ("cat", 1, (10, 10, 20, 20))]},
    })
    v12 = make_voc(tmp_path, 2012, {"trainval": {"2008_000008": [("horse", 0, (1, 2, 3, 4))],
                                                 "2007_000027": [("person", 0, (1, 2, 3, 4))]}})
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "train2017").mkdir()
    imgs = []
    for iid in (9, 25, 30):
        Image.new("RGB", (32, 24)).save(coco / "train2017" / f"{iid:012d}.jpg")
        imgs.append({"id": iid, "file_name": f"{iid:012d}.jpg", "width": 32, "height": 24})
    anns = [{"id": 1, "image_id": 9, "category_id": 5, "bbox": [1, 1, 5, 5], "iscrowd": 0},   # airplane
            {"id": 2, "image_id": 25, "category_id": 25, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # giraffe
            {"id": 3, "image_id": 30, "category_id": 5, "bbox": [1, 1, 5, 5], "iscrowd": 1}]   # crowd airplane
    (coco / "annotations" / "instances_train2017.json").write_text(json.dumps(
        {"images": imgs, "annotations": anns, "categories": [{"id": 5, "name": "airplane"}, {"id": 25, "name": "giraffe"}]}))
    return v07, v12, coco / "annotations" / "instances_train2017.json"


def test_voc_to_coco_boxes_ids_difficult_and_coco20(voc, tmp_path):
    v07, v12, coco20 = voc
    out = tmp_path / "out"
    assert main(["split", "voc", "--voc07", str(v07), "--voc12", str(v12.parent), "--coco20", str(coco20), "--out", str(out)]) == 0
    lab = json.loads((out / "voc07_trainval.json").read_text())
    assert [c["name"] for c in lab["categories"]] == list(VOC_CLASSES) and lab["categories"][0] == {"id": 1, "name": "aeroplane", "supercategory": "voc"}
    assert [im["id"] for im in lab["images"]] == [5, 7]
    root = Path(lab["info"]["image_root"])
    assert root == tmp_path.resolve() and lab["images"][0]["file_name"] == "VOCdevkit/VOC2007/JPEGImages/000005.jpg"
    a = {(x["image_id"], x["category_id"]): x for x in lab["annotations"]}
    chair, person = a[5, VOC_CLASSES.index("chair") + 1], a[5, VOC_CLASSES.index("person") + 1]
    assert chair["bbox"] == [4.0, 9.0, 10.0, 10.0] and chair["iscrowd"] == 0 and chair["area"] == 100.0
    assert person["bbox"] == [0.0, 0.0, 40.0, 30.0] and person["iscrowd"] == 1 and person["difficult"] == 1
    assert [x["id"] for x in lab["annotations"]] == [1, 2, 3]
    # dtg's loader reads it from the shared image root; the difficult box stays out of the targets
    src = load_labeled(out / "voc07_trainval.json", root, log=lambda m: None)
    assert src.num_crowd == 1 and src.records[0].boxes.tolist() == [[4.0, 9.0, 14.0, 19.0]]
    unl = json.loads((out / "voc12_trainval_coco20.json").read_text())
    assert [im["id"] for im in unl["images"]] == [9, 2007000027, 2008000008] and unl["annotations"] == []
    assert unl["images"][0]["file_name"] == "coco/train2017/000000000009.jpg"
    assert len(load_unlabeled(out / "voc12_trainval_coco20.json", root, log=lambda m: None).records) == 3
    # val: a detection on the difficult (crowd) cat neither helps nor hurts
    val = out / "voc07_test.json"
    dog = [x for x in json.loads(val.read_text())["annotations"] if not x["iscrowd"]][0]
    hit = {"image_id": 1, "category_id": dog["category_id"], "bbox": dog["bbox"], "score": 0.9}
    on_cat = {"image_id": 1, "category_id": VOC_CLASSES.index("cat") + 1, "bbox": [9.0, 9.0, 11.0, 11.0], "score": 0.95}
    assert evaluate_bbox(val, [hit])["AP"] == pytest.approx(1.0)
    assert evaluate_bbox(val, [hit, on_cat])["AP"] == pytest.approx(1.0)


def test_voc_difficult_modes_and_no_coco(voc, tmp_path):
    v07, v12, _ = voc
    for mode, n, crowd in (("keep", 3, 0), ("drop", 2, 0)):
        out = tmp_path / mode
        assert main(["split", "voc", "--voc07", str(v07), "--voc12", str(v12), "--difficult", mode, "--out", str(out)]) == 0
        anns = json.loads((out / "voc07_trainval.json").read_text())["annotations"]
        assert len(anns) == n and sum(x["iscrowd"] for x in anns) == crowd
        assert sorted(p.name for p in out.iterdir()) == ["voc07_test.json", "voc07_trainval.json", "voc12_trainval.json"]


def test_voc_bad_object_is_one_line_naming_the_xml_and_skip_bad_drops_it(voc, tmp_path, capsys):
    v07, v12, _ = voc
    xml = v07 / "Annotations" / "000007.xml"
    xml.write_text(xml.read_text().replace("tvmonitor", "unicorn"))
    out = tmp_path / "out"
    assert main(["split", "voc", "--voc07", str(v07), "--voc12", str(v12), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "000007.xml: object #0: class \"unicorn\" is not one of the 20 VOC classes" in err[-1] and "Traceback" not in "".join(err)
    assert not out.exists() or not list(out.iterdir())
    assert main(["split", "voc", "--voc07", str(v07), "--voc12", str(v12), "--out", str(out), "--skip-bad"]) == 0
    lab = json.loads((out / "voc07_trainval.json").read_text())
    assert [im["id"] for im in lab["images"]] == [5, 7] and {x["image_id"] for x in lab["annotations"]} == {5}
    (v07 / "ImageSets" / "Main" / "test.txt").unlink()
    assert main(["split", "voc", "--voc07", str(v07), "--voc12", str(v12), "--out", str(tmp_path / "o2")]) == 2
    assert "test.txt: image set not found" in capsys.readouterr().err
    assert main(["split", "voc", "--voc07", str(tmp_path), "--voc12", str(v12), "--out", str(tmp_path / "o2")]) == 2
    assert "not a VOC2007 folder" in capsys.readouterr().err


def test_voc_image_ids_numeric_and_fallback():
    from dtg.tools.voc import assign_ids, numeric_id

    assert numeric_id("000005") == 5 and numeric_id("2008_000008") == 2008000008 and numeric_id("img_a") is None
    images = [{"name": n} for n in ("zeta", "000012", "alpha", "2007_000001")]
    assign_ids(images)
    assert [e["id"] for e in images] == [2007000003, 12, 2007000002, 2007000001]
