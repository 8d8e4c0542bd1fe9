"""Rank Matching: per-cluster KL(softmax(teacher / T) || softmax(student / T)), mean over clusters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dtg.methods.dtg.losses import rank_matching_loss, segment_log_softmax


def loop_reference(student: torch.Tensor, teacher: torch.Tensor, cluster: torch.Tensor,
                   T: float = 1.0, min_size: int = 2) -> float:
    """The definition with a Python loop over clusters."""
    losses = []
    for c in cluster.unique():
        m = cluster == c
        if int(m.sum()) < min_size:
            continue
        log_dt = F.log_softmax(teacher[m].double() / T, 0)
        log_ds = F.log_softmax(student[m].double() / T, 0)
        losses.append(float((log_dt.exp() * (log_dt - log_ds)).sum()))
    return sum(losses) / len(losses) if losses else 0.0


def test_zero_for_equal_inputs() -> None:
    scores = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.6, 0.3, 0.1])
    cluster = torch.tensor([0, 0, 0, 4, 4, 4, 9])
    loss = rank_matching_loss(scores.clone(), scores, cluster)
    assert loss.dim() == 0
    assert abs(float(loss)) < 1e-7


def test_positive_for_different_rankings() -> None:
    g = torch.Generator().manual_seed(0)
    cluster = torch.randint(0, 5, (40,), generator=g)
    student, teacher = torch.rand(40, generator=g), torch.rand(40, generator=g)
    loss = rank_matching_loss(student, teacher, cluster)
    assert float(loss) > 0
    assert float(loss) == pytest.approx(loop_reference(student, teacher, cluster), rel=1e-5)


def test_hand_computed_two_clusters() -> None:
    # Cluster 5: teacher logits (ln 3, 0) -> D_t = (3/4, 1/4); student (0, 0) -> D_s = (1/2, 1/2).
    #   KL = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 0.75 ln 1.5 - 0.25 ln 2 = 0.1308120
    # Cluster 42: teacher (0, 0, 0) -> D_t = 1/3 each; student (ln 2, 0, 0) -> D_s = (1/2, 1/4, 1/4).
    #   KL = 1/3 [ln(2/3) + 2 ln(4/3)] = 0.0566330
    # Cluster 7 is a singleton (ignored). Mean over the 2 clusters = 0.0937225.
    student = torch.tensor([0.0, 0.0, math.log(2), 0.0, 0.0, 5.0])
    teacher = torch.tensor([math.log(3), 0.0, 0.0, 0.0, 0.0, -5.0])
    cluster = torch.tensor([5, 5, 42, 42, 42, 7])
    kl_a = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_b = (math.log(2 / 3) + 2 * math.log(4 / 3)) / 3
    assert kl_a == pytest.approx(0.1308120, abs=1e-7) and kl_b == pytest.approx(0.0566330, abs=1e-7)
    loss = rank_matching_loss(student, teacher, cluster)
    assert float(loss) == pytest.approx((kl_a + kl_b) / 2, abs=1e-6)
    assert float(loss) == pytest.approx(0.0937225, abs=1e-6)


def test_singletons_are_ignored() -> None:
    student = torch.tensor([0.9, 0.1, 0.5], requires_grad=True)
    teacher = torch.tensor([0.1, 0.9, 0.2])
    loss = rank_matching_loss(student, teacher, torch.tensor([3, 8, 1]))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert student.grad is not None and torch.equal(student.grad, torch.zeros(3))
    # A singleton next to a real cluster does not change the loss.
    base = rank_matching_loss(student[:2], teacher[:2], torch.tensor([0, 0]))
    with_single = rank_matching_loss(student, teacher, torch.tensor([0, 0, 1]))
    assert float(with_single.detach()) == pytest.approx(float(base.detach()), rel=1e-6)


def test_empty_input_backward() -> None:
    student = torch.zeros(0, requires_grad=True)
    loss = rank_matching_loss(student, torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert float(loss.detach()) == 0.0
    loss.backward()


def test_min_size() -> None:
    student, teacher = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.8]), torch.tensor([0.1, 0.9, 0.2, 0.6, 0.3])
    cluster = torch.tensor([0, 0, 1, 1, 1])
    only_big = rank_matching_loss(student, teacher, cluster, min_size=3)
    assert float(only_big) == pytest.approx(loop_reference(student[2:], teacher[2:], cluster[2:]), rel=1e-5)
    assert float(rank_matching_loss(student, teacher, cluster, min_size=4)) == 0.0


def test_gradient_reaches_only_the_student() -> None:
    student = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.6], requires_grad=True)
    teacher = torch.tensor([0.2, 0.8, 0.4, 0.1, 0.9], requires_grad=True)
    loss = rank_matching_loss(student, teacher, torch.tensor([0, 0, 0, 1, 1]))
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    # Softmax is shift-invariant, so each cluster's gradient sums to zero.
    assert float(student.grad[:3].sum()) == pytest.approx(0.0, abs=1e-7)
    assert float(student.grad[3:].sum()) == pytest.approx(0.0, abs=1e-7)
    # Matches autograd through the loop reference.
    ref_student = student.detach().clone().requires_grad_(True)
    ref = sum(
        (F.softmax(teacher.detach()[m], 0) * (F.log_softmax(teacher.detach()[m], 0) - F.log_softmax(ref_student[m], 0))).sum()
        for m in (slice(0, 3), slice(3, 5))
    ) / 2
    ref.backward()
    assert torch.allclose(student.grad, ref_student.grad, atol=1e-7)


def test_invariant_to_cluster_relabelling_and_order() -> None:
    g = torch.Generator().manual_seed(1)
    cluster = torch.randint(0, 6, (30,), generator=g)
    student, teacher = torch.rand(30, generator=g), torch.rand(30, generator=g)
    loss = rank_matching_loss(student, teacher, cluster)
    relabel = torch.tensor([17, 3, 1000, 0, 42, 8])  # a bijection onto non-contiguous ids
    assert float(rank_matching_loss(student, teacher, relabel[cluster])) == pytest.approx(float(loss), rel=1e-6)
    perm = torch.randperm(30, generator=g)
    assert float(rank_matching_loss(student[perm], teacher[perm], cluster[perm])) == pytest.approx(float(loss), rel=1e-6)


def test_temperature() -> None:
    g = torch.Generator().manual_seed(2)
    cluster = torch.randint(0, 4, (25,), generator=g)
    student, teacher = torch.randn(25, generator=g), torch.randn(25, generator=g)
    values = [float(rank_matching_loss(student, teacher, cluster, T=T)) for T in (0.5, 1.0, 2.0, 1000.0)]
    for T, v in zip((0.5, 1.0, 2.0, 1000.0), values):
        assert v == pytest.approx(loop_reference(student, teacher, cluster, T=T), rel=1e-4, abs=1e-6)
    assert values[0] > values[1] > values[2] > values[3]  # flatter distributions -> smaller KL
    assert values[3] < 1e-5
    # Scaling both inputs by k is the same as dividing T by k.
    assert float(rank_matching_loss(2 * student, 2 * teacher, cluster, T=2.0)) == pytest.approx(values[1], rel=1e-5)
    with pytest.raises(ValueError):
        rank_matching_loss(student, teacher, cluster, T=0.0)


def test_large_scores_are_stable() -> None:
    student = torch.tensor([1000.0, 990.0, -1000.0, -1010.0])
    teacher = torch.tensor([990.0, 1000.0, -1010.0, -1000.0])
    loss = rank_matching_loss(student, teacher, torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(loss)
    # Each cluster: D_t ~ (e^-10, 1), D_s ~ (1, e^-10): KL ~ 10 (1 - 2 e^-10).
    assert float(loss) == pytest.approx(loop_reference(student, teacher, torch.tensor([0, 0, 1, 1])), rel=1e-5)
    assert float(loss) == pytest.approx(10.0, rel=1e-3)


def test_segment_log_softmax_matches_per_segment() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5])
    seg = torch.tensor([1, 0, 1, 0, 1])
    out = segment_log_softmax(x, seg, 2)
    assert torch.allclose(out[[0, 2, 4]], F.log_softmax(x[[0, 2, 4]], 0))
    assert torch.allclose(out[[1, 3]], F.log_softmax(x[[1, 3]], 0))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        rank_matching_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3, dtype=torch.int64))


# ----------------------------------------------------------------------------- on the INC losses' scale

from dtg.methods.dtg.losses import inc_classification_loss, inc_rank_matching_loss  # noqa: E402
from dtg.methods.dtg.targets import IncTargets  # noqa: E402
from dtg.methods.dtg.losses import cluster_kl  # noqa: E402


def test_cluster_kl_per_cluster_and_zero_for_a_singleton() -> None:
    student = torch.tensor([0.0, 0.0, math.log(2), 0.0, 0.0, 5.0])
    teacher = torch.tensor([math.log(3), 0.0, 0.0, 0.0, 0.0, -5.0])
    kl, counts = cluster_kl(student, teacher, torch.tensor([5, 5, 42, 42, 42, 7]))
    kl_a = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_b = (math.log(2 / 3) + 2 * math.log(4 / 3)) / 3
    assert counts.tolist() == [2, 1, 3]  # ids 5, 7, 42 in increasing order
    assert kl.tolist() == pytest.approx([kl_a, 0.0, kl_b], abs=1e-6)


def _batch():
    """Two 3-member clusters of class 2 and 3 background RoIs; every member has the same focal loss
    (equal logits), the clusters different KLs."""
    cluster = torch.tensor([0, 0, 0, 1, 1, 1, -1, -1, -1])
    labels = torch.tensor([2, 2, 2, 2, 2, 2, 0, 0, 0])
    tg = IncTargets(labels=labels, reg_targets=torch.zeros(9, 4), reg_mask=labels > 0, cluster=cluster,
                    teacher_scores=torch.zeros(9), num_clusters=2)
    logits = torch.zeros(9, 4)
    logits[6:, 0] = 30.0  # background RoIs classified as background: ~0 focal loss
    p_s = torch.tensor([0.5, 0.5, 0.5, 0.2, 0.6, 0.9])
    p_t = torch.tensor([0.9, 0.5, 0.1, 0.9, 0.6, 0.2])
    return tg, logits, p_s, p_t, cluster[:6]


@pytest.mark.parametrize("normalize", ["cluster", "samples", "supervised"])
def test_inc_scale_keeps_rm_to_inc_ratio_whatever_the_normalisation(normalize) -> None:
    """With clusters of equal size, L_RM / L_cls is the same ratio under every normalisation with
    scale='inc' (so rm_weight means one thing), and under 'cluster' RM is the mean KL over clusters."""
    tg, logits, p_s, p_t, members = _batch()
    kl, _ = cluster_kl(p_s, p_t, members)
    den = 64
    cls = inc_classification_loss(logits, tg, normalize, 2.0, denominator=den)
    rm = inc_rank_matching_loss(p_s, p_t, members, normalize, 1.0, "inc", denominator=den, labelled=9)
    ref_cls = inc_classification_loss(logits, tg, "cluster", 2.0)
    assert float(rm / cls) == pytest.approx(float(kl.mean() / ref_cls), rel=1e-4)
    old = inc_rank_matching_loss(p_s, p_t, members, normalize, 1.0, "clusters", denominator=den, labelled=9)
    assert float(old) == pytest.approx(float(kl.mean()), rel=1e-6)  # before issue 25: the same RM whatever the INC scale
    # ... so against per-sample INC it weighed (samples per cluster member) times more: 9 / 6, 64 / 6
    assert float(old / rm) == pytest.approx({"cluster": 1.0, "samples": 9 / 6, "supervised": den / 6}[normalize], rel=1e-5)


def test_inc_scale_counts_one_member_clusters() -> None:
    student = torch.tensor([0.0, 0.0, math.log(2), 0.0, 0.0, 5.0])
    teacher = torch.tensor([math.log(3), 0.0, 0.0, 0.0, 0.0, -5.0])
    cluster = torch.tensor([5, 5, 42, 42, 42, 7])
    kl_a = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    kl_b = (math.log(2 / 3) + 2 * math.log(4 / 3)) / 3
    inc = inc_rank_matching_loss(student, teacher, cluster, "cluster", scale="inc")
    assert float(inc) == pytest.approx((kl_a + kl_b) / 3, abs=1e-6)  # the singleton counts, with 0
    old = inc_rank_matching_loss(student, teacher, cluster, "cluster", scale="clusters")
    assert float(old) == pytest.approx((kl_a + kl_b) / 2, abs=1e-6)
    per_sample = inc_rank_matching_loss(student, teacher, cluster, "samples", scale="inc", labelled=20)
    assert float(per_sample) == pytest.approx((2 * kl_a + 3 * kl_b) / 20, abs=1e-6)
    sup = inc_rank_matching_loss(student, teacher, cluster, "supervised", scale="inc", denominator=512)
    assert float(sup) == pytest.approx((2 * kl_a + 3 * kl_b) / 512, abs=1e-7)


def test_inc_scale_without_members_is_an_attached_zero() -> None:
    s = torch.zeros(0, requires_grad=True)
    loss = inc_rank_matching_loss(s, torch.zeros(0), torch.zeros(0, dtype=torch.int64), "samples", labelled=0)
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="scale"):
        inc_rank_matching_loss(s, torch.zeros(0), torch.zeros(0, dtype=torch.int64), scale="mean")
