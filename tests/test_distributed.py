"""Two gloo processes (torch.multiprocessing, as torchrun would start them) against one process.

One start of 2 processes runs, in each rank: an uninterrupted 3-iteration run on
box-less labeled images (below), the same with boxes, the latter again stopped at 2
and resumed to 3 (fresh Trainer, state from the file), and a run with a NaN loss on
rank 1 only. The test then checks in this process:

* the global batch of each step is the one-process batch of the same global size
  (same images, same augmentation: the per-rank streams are disjoint shares);
* both ranks hold bit-identical state (student, teacher, optimizer, RNG of every
  rank, history), and the checkpoint rank 0 wrote equals rank 1's state;
* the resumed 2-process run ends bit-identical to the uninterrupted one (each rank's RNG restored);
* a non-finite loss on one rank skips the step on both;
* sharded evaluation gathered on rank 0 equals a one-process evaluation;
* the weights match a one-process run with the same global batch.

The last point needs a configuration in which the two are the same computation,
because in general they are not: (1) BatchNorm over 1 image per rank is not BN over
2 images, which is why trainable BN becomes cross-rank BN under DDP (tested here);
(2) Faster R-CNN normalises its RPN/R-CNN losses by the number of sampled
anchors/RoIs of the whole batch, so a 2-image mean is the mean of two per-image
losses only when both images sample the same number; (3) the samplers draw with
each rank's own RNG. Labeled images without boxes (and no pseudo boxes) with
sampling quotas above the anchor/proposal counts make every image sample all of
its anchors and proposals: same counts, no random choice. All images pad to 96x96.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.multiprocessing as mp

from dtg.config import from_dict, load_config, to_dict
from dtg.data.coco import load_labeled
from dtg.data.dataset import LabelMap
from dtg.engine.checkpoint import load_checkpoint, model_from_checkpoint
from dtg.dist import all_true, mean_scalars
from dtg.engine.step import StudentLoss
from dtg.engine.trainer import Trainer
from dtg.evaluation.inference import predict_source

from conftest import intercept_step, tiny_config

pytestmark = pytest.mark.slow

ITERS = 3
VIEW = "{short_edge: [96, 96], max_size: 96, flip_prob: 0.5}"


def _config(paths: Any, labeled_json: Path, out: Path, per_rank: int, *extra: str) -> dict:
    cfg = tiny_config(
        paths, out, "method=sparse", f"data.train_json={labeled_json}", f"data.val_json={paths.train_full}",
        f"data.val_images={paths.train_images}", f"data.batch_labeled={per_rank}", f"data.batch_unlabeled={per_rank}",
        f"data.labeled_view={VIEW}", f"data.weak_view={VIEW}",
        "data.strong_view={short_edge: [96, 96], max_size: 96, flip_prob: 0.5, strong: true}",
        "semi.burn_in=0", "semi.alpha_warmup=1", "sparse.pseudo_score_thresh=1.0",
        "model.rpn_batch_size_per_image=4096", "model.rpn_post_nms_top_n_train=32", "model.roi_batch_size_per_image=64",
        f"solver.max_iter={ITERS}", "checkpoint_period=1", *extra,
    )
    return to_dict(cfg)


def _batch_keys(batch: dict) -> list[tuple]:
    """What identifies each item of a batch: branch, image id, and its view(s) (a digest of the pixels)."""
    out = []
    for it in batch["sup"]:
        out.append(("sup", it["image_id"], round(float(it["image"].sum()), 2)))
    for it in batch["unsup"]:
        out.append(("unsup", it["image_id"], round(float(it["weak"].sum()), 2), round(float(it["strong"].sum()), 2)))
    return out


def _recording_trainer(cfg: dict, seen: list, log: list | None = None) -> Trainer:
    t = Trainer(from_dict(cfg), log=(log if log is not None else []).append, progress=False)
    intercept_step(t.step, lambda call, batch, it: (seen.append(_batch_keys(batch)), call())[1])
    return t


def _worker(rank: int, world: int, port: int, cfgs: dict[str, dict], out: str) -> None:
    watchdog = threading.Timer(90, os._exit, (3,))  # a rank waiting forever for the other fails the test instead
    watchdog.daemon = True
    watchdog.start()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    seen: list = []
    log: list[str] = []
    t = _recording_trainer(cfgs["full"], seen, log)
    summary = t.train()
    reduced = mean_scalars(t.dist, {"x": float(rank), "only_rank0": 1.0} if rank == 0 else {"x": float(rank)})
    agreed = [all_true(t.dist, rank == 0), all_true(t.dist, True)]
    torch.save({"state": t.state_dict(), "seen": seen, "summary": summary, "log": log, "reduced": reduced,
                "agreed": agreed}, Path(out) / f"full_rank{rank}.pt")
    t = Trainer(from_dict(cfgs["whole"]), log=lambda m: None, progress=False)
    t.train()
    torch.save({"state": t.state_dict()}, Path(out) / f"whole_rank{rank}.pt")
    Trainer(from_dict(cfgs["half"]), log=lambda m: None, progress=False).train()
    t = Trainer(from_dict(cfgs["split"]), log=lambda m: None, progress=False)
    t.resume(Path(cfgs["split"]["output_dir"]) / "checkpoints" / "last.pth")
    t.train()
    torch.save({"state": t.state_dict()}, Path(out) / f"split_rank{rank}.pt")
    # A NaN loss on rank 1 only, at iteration 1: both ranks must skip that step (or DDP would hang).
    real = StudentLoss.forward
    StudentLoss.forward = lambda self, tch, b, it: _nan_on_rank1(real(self, tch, b, it), rank, it)  # type: ignore
    t = Trainer(from_dict(cfgs["nan"]), log=lambda m: None, progress=False)
    summary = t.train()
    torch.save({"state": t.state_dict(), "summary": summary}, Path(out) / f"nan_rank{rank}.pt")


def _nan_on_rank1(out: tuple[dict, dict], rank: int, iteration: int) -> tuple[dict, dict]:
    losses, stats = out
    if rank == 1 and iteration == 1:
        losses = {**losses, "sup_rcnn_cls": losses["sup_rcnn_cls"] * float("nan")}
    return losses, stats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical nested states (tensors with torch.equal, numpy arrays elementwise)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "shape"):  # numpy RNG state
        assert (a == b).all(), where
    else:
        assert a == b, where


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny convolutions run ~10x faster on one thread than on two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory) -> Iterator[dict[str, Any]]:
    with _one_thread():
        yield _runs(tiny_dataset, tmp_path_factory)


def _runs(tiny_dataset: Any, tmp_path_factory: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    tmp = tmp_path_factory.mktemp("ddp")
    data = json.loads(Path(tiny_dataset.train_labeled).read_text())
    data["annotations"] = []
    boxless = tmp / "labeled_no_boxes.json"
    boxless.write_text(json.dumps(data))
    cfgs = {
        "full": _config(tiny_dataset, boxless, tmp / "full", 1),
        # with boxes: the ranks' samplers draw different numbers, so each rank's RNG is its own
        "whole": _config(tiny_dataset, tiny_dataset.train_labeled, tmp / "whole", 1),
        "half": _config(tiny_dataset, tiny_dataset.train_labeled, tmp / "split", 1, "solver.max_iter=2"),
        "split": _config(tiny_dataset, tiny_dataset.train_labeled, tmp / "split", 1),
        "nan": _config(tiny_dataset, boxless, tmp / "nan", 1, "data.val_json="),
    }
    # fork: the children inherit the imported modules (spawn would re-import torch: ~10 s on 2 cores)
    mp.start_processes(_worker, args=(2, _free_port(), cfgs, str(tmp)), nprocs=2, join=True, start_method="fork")
    print(f"2 processes: {time.perf_counter() - t0:.1f} s")
    seen: list = []
    one = _recording_trainer(_config(tiny_dataset, boxless, tmp / "one", 2), seen)
    init = {k: v.clone() for k, v in one.model.net.state_dict().items()}
    one.train()
    print(f"+ 1 process: {time.perf_counter() - t0:.1f} s")
    ranks = [torch.load(tmp / f"full_rank{r}.pt", weights_only=False) for r in range(2)]
    return {"tmp": tmp, "ranks": ranks, "one": one, "one_seen": seen, "init": init, "paths": tiny_dataset}


def test_global_batch_is_the_one_process_batch(runs) -> None:
    r0, r1 = (r["seen"] for r in runs["ranks"])
    assert len(r0) == len(r1) == len(runs["one_seen"]) == ITERS
    for step, (a, b, one) in enumerate(zip(r0, r1, runs["one_seen"])):
        assert len(a) == len(b) == 2 and not set(a) & set(b), step  # 1 labeled + 1 unlabeled each, disjoint
        assert sorted(a + b) == sorted(one), step


def test_ranks_hold_identical_state_and_rank0_checkpoint_equals_rank1_state(runs) -> None:
    s0, s1 = (r["state"] for r in runs["ranks"])
    assert s0["iteration"] == ITERS and s0["sampler"]["world_size"] == 2 and len(s0["rng_ranks"]) == 2
    _assert_same(s0, s1, "state")
    written = load_checkpoint(runs["tmp"] / "full" / "checkpoints" / "last.pth")
    _assert_same(written, s1, "last.pth")
    s0, s1 = ({k: v for k, v in r["summary"].items() if k != "train_seconds"} for r in runs["ranks"])  # own clocks
    assert s0 == s1 and s0["world_size"] == 2 and "student" in s0


def test_only_rank0_logs_and_writes_tensorboard_and_collectives_reduce(runs) -> None:
    r0, r1 = runs["ranks"]
    assert any(line.startswith("data: ") for line in r0["log"]) and r1["log"] == []
    assert len(list((runs["tmp"] / "full" / "tb").iterdir())) == 1, "one event file"
    for r in (r0, r1):
        assert r["reduced"] == {"x": 0.5, "only_rank0": 1.0} and r["agreed"] == [False, True]


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_both(runs) -> None:
    nan = [torch.load(runs["tmp"] / f"nan_rank{r}.pt", weights_only=False) for r in range(2)]
    _assert_same(nan[0]["state"], nan[1]["state"], "nan")
    assert nan[0]["state"]["nonfinite"] == {"total": 1, "streak": 0} and nan[0]["summary"]["nonfinite_steps"] == 1
    full = runs["ranks"][0]["state"]
    assert not torch.equal(nan[0]["state"]["student"]["rpn.head.conv.0.0.weight"], full["student"]["rpn.head.conv.0.0.weight"])


def test_resumed_two_process_run_equals_uninterrupted(runs) -> None:
    split = [torch.load(runs["tmp"] / f"split_rank{r}.pt", weights_only=False)["state"] for r in range(2)]
    _assert_same(split[0], split[1], "split")
    full = torch.load(runs["tmp"] / "whole_rank0.pt", weights_only=False)["state"]
    assert not torch.equal(full["rng_ranks"][0]["torch"], full["rng_ranks"][1]["torch"]), "ranks' RNGs differ here"
    for key in ("student", "teacher", "optimizer", "rng_ranks"):
        _assert_same(split[0][key], full[key], key)


def test_sharded_evaluation_equals_one_process_evaluation(runs) -> None:
    tmp, paths = runs["tmp"], runs["paths"]
    ckpt = load_checkpoint(tmp / "full" / "checkpoints" / "last.pth")
    cfg, model = model_from_checkpoint(ckpt, "student", "last.pth")
    source = load_labeled(paths.train_full, paths.train_images, log=lambda m: None)
    assert len(source.records) > 8, "at least 3 eval batches of 4: both ranks predict"
    with _one_thread():
        expected = predict_source(model, source, LabelMap(ckpt["categories"]), cfg.data.test_size,
                                  cfg.data.test_max_size, torch.device("cpu"), progress=False)
    written = json.loads((tmp / "full" / "results_student.json").read_text())
    assert written == json.loads(json.dumps(expected)) and len(written) > 0
    metrics = json.loads((tmp / "full" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["student"] == runs["ranks"][0]["summary"]["student"]


def test_two_processes_match_one_process_with_the_same_global_batch(runs) -> None:
    full = runs["ranks"][0]["state"]
    one = runs["one"].state_dict()
    fresh = runs["init"]
    for name in ("student", "teacher"):
        moved = 0
        for k, v in one[name].items():
            if v.dtype.is_floating_point:
                torch.testing.assert_close(full[name][k], v, rtol=1e-4, atol=1e-5, msg=f"{name}.{k}")
                moved += not torch.equal(v, fresh[k])
            else:
                assert torch.equal(full[name][k], v), f"{name}.{k}"
        assert moved > len(one[name]) // 2, f"{name}: training changed most tensors"


@pytest.mark.parametrize("name", ["coco_10pct", "coco_full", "voc07_12"])
def test_one_gpu_configs_are_the_paper_configs_under_the_linear_rule(name: str) -> None:
    k = 8  # 8 GPUs -> 1 at the same per-GPU batch: a k times smaller global batch
    root = Path(__file__).parent.parent / "configs"
    eight, one = to_dict(load_config(root / f"{name}.yaml")), to_dict(load_config(root / f"{name}_1gpu.yaml"))
    assert one["solver"]["lr"] == pytest.approx(eight["solver"]["lr"] / k)
    assert abs(one["semi"]["ema_momentum"] ** k - eight["semi"]["ema_momentum"]) < 1e-6
    scaled = [("solver", "max_iter"), ("solver", "warmup_iters"), ("semi", "alpha_warmup"), ("semi", "burn_in"),
              (None, "eval_period"), (None, "checkpoint_period")]
    for section, key in scaled:
        a, b = (eight, one) if section is None else (eight[section], one[section])
        assert b[key] == a[key] * k, key
    assert one["solver"]["steps"] == [s * k for s in eight["solver"]["steps"]]
    assert one["output_dir"] == eight["output_dir"] + "_1gpu"
    for cfg in (eight, one):  # everything else is the paper's
        for section, key in scaled + [("solver", "lr"), ("solver", "steps"), ("semi", "ema_momentum"), (None, "output_dir")]:
            (cfg if section is None else cfg[section]).pop(key)
    assert one == eight
