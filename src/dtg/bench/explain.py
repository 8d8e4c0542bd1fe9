"""``dtg explain``: a look inside the R-CNN stage of DTG (docs/method.md, "INC in the R-CNN stage" and "Rank Matching").

In the spirit of the DTG-SSOD paper's figures 2(b) and 3, for one image and one checkpoint:
the teacher's R-CNN clusters on its weak view (candidates ``p >= dtg.rcnn.tau`` grouped by greedy
NMS, exactly as training builds them with :func:`dtg.methods.dtg.image_targets.rcnn_image_targets`), and the student RoIs
on the strong view (the same proposals mapped by ``M``) coloured by the INC label they
induce, with each cluster's teacher rank vs student rank (what Rank Matching compares).

:func:`explain_rcnn` turns model outputs into plain data (testable without images or models),
:func:`explain_checkpoint` runs the checkpoint's teacher and student on one image, and
:func:`render` draws the two panels with PIL.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import clip_boxes_to_image

from dtg.config import Config, ConfigError
from dtg.data.coco import load_image
from dtg.geometry import teacher_to_student
from dtg.data.augment import View, make_view
from dtg.engine.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from dtg.methods.dtg.targets import IncTargets
from dtg.config import RcnnStageConfig
from dtg.methods.dtg.image_targets import rcnn_image_targets
from dtg.methods import build_method
from dtg.methods.dtg.method import DTGMethod
from dtg.models.detector import Detector

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (255, 225, 25), (170, 110, 40)]
BACKGROUND = (150, 150, 150, 140)  # faint gray, RGBA
MAX_RANKS = 14  # rank entries shown per cluster row


@dataclass
class ClusterInfo:
    """One teacher cluster. Member lists are aligned and sorted by descending teacher score.

    Attributes:
        id: cluster id of :class:`IncTargets` (NMS keep position, 0 = highest kept score).
        label: class 1..K. kept: proposal index of the kept (target) box.
        members: proposal indices of the members (the kept box first).
        teacher_scores: teacher probability ``p`` of ``label``; student_scores: the student's
            softmax probability of ``label`` on the member's RoI (strong view).
        ignored: the member's RoI left the student view (no loss, no rank).
        teacher_rank / student_rank: rank (0 = highest) among the non-ignored members, -1 if ignored.
        kendall: Kendall tau between the two orders (None with fewer than 2 ranked members).
    """

    id: int
    label: int
    kept: int
    members: list[int]
    teacher_scores: list[float]
    student_scores: list[float]
    ignored: list[bool]
    teacher_rank: list[int]
    student_rank: list[int]
    kendall: float | None


@dataclass
class Explanation:
    """Plain data of one image. Boxes: teacher (weak) view for ``teacher_boxes``, student view for ``rois``."""

    teacher_boxes: Tensor  # (P, 4) proposals decoded with class c's deltas, clipped
    teacher_scores: Tensor  # (P,) p = max foreground probability
    rois: Tensor  # (P, 4) the proposals mapped into the student view
    targets: IncTargets  # the R-CNN INC targets, RoIs that left the student view ignored
    tau: float
    candidates: list[int]  # proposal indices with p >= tau
    clusters: list[ClusterInfo]
    background: list[int]  # proposal indices labelled background, in proposal (objectness) order
    ignored: list[int]  # proposal indices ignored (RoI outside the student view)
    meta: dict[str, Any] = field(default_factory=dict)


def _ranks(scores: list[float]) -> list[int]:
    """Rank of each score, 0 = highest; ties keep the given order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    rank = [0] * len(scores)
    for r, i in enumerate(order):
        rank[i] = r
    return rank


def _kendall(a: list[int], b: list[int]) -> float | None:
    """Kendall tau of two rankings of the same items (no ties)."""
    n = len(a)
    if n < 2:
        return None
    x, y = np.asarray(a), np.asarray(b)
    s = np.sign(x[:, None] - x[None]) * np.sign(y[:, None] - y[None])
    return float(s.sum() / (n * (n - 1)))


@torch.no_grad()
def explain_rcnn(
    teacher_logits: Tensor, teacher_deltas: Tensor, proposals: Tensor, t2s: Tensor,
    teacher_size: tuple[int, int], student_size: tuple[int, int], box_coder: BoxCoder,
    student_logits: Tensor | None, stage: RcnnStageConfig,
) -> Explanation:
    """Clusters, INC labels and ranks of one image, as :class:`DTGMethod` builds them.

    Args:
        teacher_logits: (P, K + 1), teacher_deltas: (P, (K + 1) * 4): the teacher's R-CNN on
            its own (P, 4) ``proposals`` (weak view).
        t2s: (3, 3) teacher-to-student matrix ``M``; teacher_size / student_size: ``(H, W)``.
        box_coder: the R-CNN box coder.
        student_logits: (P, K + 1) the student's R-CNN on the mapped RoIs (strong view), in the
            order of ``map_proposals(proposals, t2s, student_size)``; None: student scores 0.
        stage: the R-CNN stage's config of the run (``dtg.rcnn``; ``stage.tau`` is the candidate threshold).
    """
    tau = stage.tau
    rois, final, tg, outside = rcnn_image_targets(teacher_logits, teacher_deltas, proposals, t2s, student_size,
                                                  teacher_size, box_coder, stage)
    # The boxes NMS clustered (drawing only; the clustering itself is rcnn_inc_targets').
    num = teacher_logits.shape[0]
    p, c = teacher_logits.float().softmax(-1)[:, 1:].max(dim=1)
    deltas = teacher_deltas.reshape(num, -1, 4)[torch.arange(num), c + 1]
    boxes = clip_boxes_to_image(box_coder.decode_single(deltas.float(), proposals.float()), teacher_size)
    s_prob = student_logits.float().softmax(-1) if student_logits is not None else None
    clusters = []
    for cid in range(tg.num_clusters):
        idx = (tg.cluster == cid).nonzero().squeeze(1).tolist()
        idx.sort(key=lambda i: -float(p[i]))
        label = int(tg.classes[idx[0]])
        t_sc = [float(p[i]) for i in idx]
        s_sc = [float(s_prob[i, label]) if s_prob is not None else 0.0 for i in idx]
        ign = [bool(outside[i]) for i in idx]
        active = [j for j, g in enumerate(ign) if not g]
        t_r, s_r = [-1] * len(idx), [-1] * len(idx)
        for j, r in zip(active, _ranks([t_sc[j] for j in active])):
            t_r[j] = r
        for j, r in zip(active, _ranks([s_sc[j] for j in active])):
            s_r[j] = r
        kept = max(idx, key=lambda i: (float(p[i]), -i))  # the kept box scores highest in its cluster
        clusters.append(ClusterInfo(cid, label, kept, idx, t_sc, s_sc, ign, t_r, s_r,
                                    _kendall([t_r[j] for j in active], [s_r[j] for j in active])))
    return Explanation(
        teacher_boxes=boxes, teacher_scores=p, rois=rois, targets=final, tau=tau,
        candidates=(p >= tau).nonzero().squeeze(1).tolist(), clusters=clusters,
        background=(final.classes == 0).nonzero().squeeze(1).tolist(),
        ignored=outside.nonzero().squeeze(1).tolist(),
    )


def load_models(ckpt: dict[str, Any], path: str | Path) -> tuple[Config, Detector, Detector, list[str]]:
    """(config, teacher, student, class names) of a checkpoint written by ``dtg train``; eval mode."""
    if "teacher" not in ckpt:
        raise CheckpointError(f"{path}: has no teacher model (method '{ckpt.get('config', {}).get('method')}'); "
                              "explain needs a semi-supervised checkpoint")
    cfg, teacher = model_from_checkpoint(ckpt, "teacher", path)
    _, student = model_from_checkpoint(ckpt, "student", path)
    names = [str(c["name"]) for c in sorted(ckpt["categories"], key=lambda c: int(c["id"]))]
    models = [teacher.eval(), student.eval()]
    return cfg, models[0], models[1], names


def rcnn_method(cfg: Config, tau: float, device: torch.device) -> DTGMethod:
    """The registry's DTG method for the R-CNN stage of ``cfg`` (any method's checkpoint), with
    ``dtg.rcnn.tau=tau``: its R-CNN stage is ``cfg``'s (``dtg.rcnn``); the RPN stage and
    ``dtg.rcnn.subsample``, ``dtg.rcnn.background`` and ``dtg.rcnn.append_kept`` are off (every RoI is
    drawn, no global random state is used)."""
    d = replace(cfg.dtg, rcnn=replace(cfg.dtg.rcnn, tau=tau, enabled=True, subsample=False, background=0,
                                      append_kept=False),
                rpn=replace(cfg.dtg.rpn, enabled=False))
    method = build_method(replace(cfg, method="dtg", dtg=d), device)
    assert isinstance(method, DTGMethod)
    return method


@torch.no_grad()
def explain_checkpoint(
    checkpoint: str | Path, image: str | Path, seed: int = 0, tau: float | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Explanation, View, View, list[str]]:
    """Views of ``image`` (``make_view`` weak then strong, one ``random.Random(seed)``, as training
    draws them) and the :class:`Explanation` of the checkpoint's teacher and student on them.

    Returns ``(explanation, weak view, strong view, class names)``; ``tau`` defaults to the
    checkpoint's ``dtg.rcnn.tau``. Both models run in eval mode. The teacher pass and the RoIs are
    the DTG method's (:meth:`DTGMethod.teacher_targets`, :func:`rcnn_method`), with the R-CNN
    stage's config (``dtg.rcnn``).
    """
    img = load_image(image)  # DatasetError naming the file
    ckpt = load_checkpoint(checkpoint)
    cfg, teacher, student, names = load_models(ckpt, checkpoint)
    tau = cfg.dtg.rcnn.tau if tau is None else float(tau)
    if not 0.0 <= tau <= 1.0:
        raise ConfigError(f"--tau-rcnn must be in [0, 1], got {tau}")
    rng = random.Random(seed)
    weak = make_view(img, rng, cfg.data.weak_view)
    strong = make_view(img, rng, cfg.data.strong_view)
    m = teacher_to_student(weak.matrix, strong.matrix)
    teacher.to(device), student.to(device)
    method = rcnn_method(cfg, tau, torch.device(device))
    item = {"weak": weak.image, "strong": strong.image, "weak_matrix": weak.matrix, "strong_matrix": strong.matrix}
    tt = method.teacher_targets(teacher, [item])  # the teacher pass and R-CNN targets of training
    assert tt.rcnn is not None
    t = tt.teacher
    proposals = t.dense.proposals[0]
    s = student.forward_dense([strong.image.to(device)])
    s_logits, _ = student.roi_forward(s.features, [tt.rcnn.images[0].rois], s.images.image_sizes)
    ex = explain_rcnn(t.logits.cpu(), t.deltas.cpu(), proposals.cpu(), m, weak.size, strong.size,
                      teacher.rcnn_box_coder, s_logits.cpu(), method.d.rcnn)
    ex.meta = {"checkpoint": Path(checkpoint).name, "image": Path(image).name, "seed": seed,
               "iteration": ckpt.get("iteration"), "method": cfg.method}
    return ex, weak, strong, names


# ----------------------------------------------------------------------------- drawing


def _pil(view: View, height: int) -> tuple[Image.Image, float, float]:
    """The view as an RGBA image ``height`` px tall; returns (image, sx, sy)."""
    arr = (view.image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    h, w = view.size
    width = max(1, round(w * height / h))
    return Image.fromarray(arr).convert("RGBA").resize((width, height), Image.Resampling.BILINEAR), width / w, height / h


def draw_box(draw: ImageDraw.ImageDraw, b: list[float], sx: float, sy: float, color: tuple, width: int) -> None:
    draw.rectangle([b[0] * sx, b[1] * sy, max(b[0] * sx, b[2] * sx - 1), max(b[1] * sy, b[3] * sy - 1)],
                   outline=color, width=width)


def draw_tag(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: tuple, font: Any,
         taken: list[tuple[float, float, float, float]]) -> None:
    """Text on a filled box of ``color`` above ``xy`` (below it at the top edge), moved down
    past the boxes in ``taken`` (tags already drawn) so that tags never cover each other."""
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    w, h = r - l + 3, b - t + 3
    x, y = xy[0], xy[1] - h
    y = y if y >= 0 else xy[1]
    for _ in range(len(taken)):
        hit = [o for o in taken if x < o[2] and o[0] < x + w and y < o[3] and o[1] < y + h]
        if not hit:
            break
        y = max(o[3] for o in hit) + 1
    taken.append((x, y, x + w, y + h))
    draw.rectangle([x, y, x + w, y + h], fill=color)
    draw.text((x + 2 - l, y + 1 - t), text, fill=(0, 0, 0) if sum(color[:3]) > 380 else (255, 255, 255), font=font)


def render(
    ex: Explanation, weak: View, strong: View, names: list[str], max_clusters: int = 8,
    max_background: int = 50, height: int = 384,
) -> Image.Image:
    """Teacher panel | student panel | rank table, under a title line (an RGB PIL image).

    Left: weak view, every member of the first ``max_clusters`` clusters (highest kept score
    first) thin, the kept box thick, one palette colour per cluster, ``class score`` of the kept
    box. Right: strong view, those clusters' member RoIs in their colour (the kept box's RoI
    thick), up to ``max_background`` background RoIs (first in objectness order) in faint gray,
    ignored RoIs not drawn. Table: per cluster, the members in teacher order (``T``) and each
    one's rank under the student's probability of the cluster class (``S``).
    """
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    shown = ex.clusters[:max(0, max_clusters)]
    left, sxl, syl = _pil(weak, height)
    right, sxr, syr = _pil(strong, height)
    overlay = Image.new("RGBA", right.size, (0, 0, 0, 0))
    od = ImageDraw.Draw(overlay)
    for i in ex.background[:max_background]:
        draw_box(od, ex.rois[i].tolist(), sxr, syr, BACKGROUND, 1)
    right = Image.alpha_composite(right, overlay)
    dl, dr = ImageDraw.Draw(left), ImageDraw.Draw(right)
    for k, cl in reversed(list(enumerate(shown))):  # the highest-scoring cluster on top
        col = PALETTE[k % len(PALETTE)]
        for i, ign in zip(cl.members, cl.ignored):
            draw_box(dl, ex.teacher_boxes[i].tolist(), sxl, syl, col, 3 if i == cl.kept else 1)
            if not ign:
                draw_box(dr, ex.rois[i].tolist(), sxr, syr, col, 3 if i == cl.kept else 1)
    taken_l: list[tuple[float, float, float, float]] = []
    taken_r: list[tuple[float, float, float, float]] = []
    for k, cl in enumerate(shown):
        col = PALETTE[k % len(PALETTE)]
        b = ex.teacher_boxes[cl.kept].tolist()
        draw_tag(dl, (b[0] * sxl, b[1] * syl), f"{k} {names[cl.label - 1]} {cl.teacher_scores[0]:.2f}", col, small, taken_l)
        if not cl.ignored[0]:
            r = ex.rois[cl.kept].tolist()
            draw_tag(dr, (r[0] * sxr, r[1] * syr), str(k), col, small, taken_r)

    cell, pad, line, head = 22, 8, 16, 44
    table_w = pad * 2 + 30 + cell * MAX_RANKS
    rows = ["teacher rank (T) / student rank (S)", "members in teacher order; x: RoI ignored"]
    more = len(ex.clusters) - len(shown)
    body = max(height, line * len(rows) + (3 * line + 2) * len(shown) + (line + 6) * (more > 0))
    canvas = Image.new("RGB", (left.width + right.width + table_w + pad * 2, head + body + pad), "white")
    canvas.paste(left.convert("RGB"), (0, head))
    canvas.paste(right.convert("RGB"), (left.width + pad, head))
    d = ImageDraw.Draw(canvas)
    m = ex.meta
    members = sum(len(c.members) for c in ex.clusters)
    d.text((pad, 4), f"{m.get('checkpoint', '?')} (iter {m.get('iteration')}, {m.get('method')})  |  "
           f"{m.get('image', '?')} (seed {m.get('seed')})  |  tau_rcnn={ex.tau:.2f}  |  "
           f"{len(ex.clusters)} clusters, {members} members, {len(ex.background)} background, "
           f"{len(ex.ignored)} ignored", fill="black", font=font)
    d.text((pad, 24), "teacher, weak view: R-CNN clusters (thick = kept)", fill=(60, 60, 60), font=small)
    d.text((left.width + pad * 2, 24), "student, strong view: RoIs by INC label (gray = background)",
           fill=(60, 60, 60), font=small)
    x0, y = left.width + right.width + pad * 3, head
    for text in rows:
        d.text((x0, y), text, fill="black", font=small)
        y += line
    for k, cl in enumerate(shown):
        col = PALETTE[k % len(PALETTE)]
        y += 4
        d.rectangle([x0, y + 2, x0 + 10, y + 12], fill=col)
        kt = "" if cl.kendall is None else f", Kendall {cl.kendall:+.2f}"
        d.text((x0 + 16, y), f"{k}: {names[cl.label - 1]}, {len(cl.members)} member{'s' * (len(cl.members) > 1)}{kt}",
               fill="black", font=small)
        for tag, ranks in (("T", cl.teacher_rank), ("S", cl.student_rank)):
            y += line
            d.text((x0 + 4, y), tag, fill="black", font=small)
            for j, r in enumerate(ranks[:MAX_RANKS]):
                d.text((x0 + 30 + j * cell, y), "x" if r < 0 else str(r), fill="black", font=small)
            if len(ranks) > MAX_RANKS:
                d.text((x0 + 30 + MAX_RANKS * cell - 8, y), "..", fill="black", font=small)
        y += line - 2
    if more:
        d.text((x0, y + 6), f"+{more} more cluster{'s' * (more > 1)} not drawn (--max-clusters)", fill="black", font=small)
    return canvas
