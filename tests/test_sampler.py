import itertools

import pytest

from dtg.data.sampler import LABELED, UNLABELED, MixedBatchSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_every_batch_has_the_configured_composition():
    s = MixedBatchSampler(7, 23, n_labeled=1, n_unlabeled=4, seed=3)
    for batch in take(s, 50):
        assert [k.source for k in batch] == [LABELED] + [UNLABELED] * 4
        assert all(0 <= k.index < 7 for k in batch[:1]) and all(0 <= k.index < 23 for k in batch[1:])


def test_each_pass_is_a_permutation_and_passes_differ():
    s = MixedBatchSampler(10, 0, n_labeled=2, n_unlabeled=0, seed=0)
    idx = [k.index for b in take(s, 10) for k in b]  # two passes of 10
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:]) == list(range(10))
    assert idx[:10] != idx[10:]


def test_same_seed_same_sequence_other_seed_differs():
    a = [[(k.index, k.seed) for k in b] for b in take(MixedBatchSampler(9, 30, 1, 4, seed=5), 20)]
    b = [[(k.index, k.seed) for k in b] for b in take(MixedBatchSampler(9, 30, 1, 4, seed=5), 20)]
    c = [[(k.index, k.seed) for k in b] for b in take(MixedBatchSampler(9, 30, 1, 4, seed=6), 20)]
    assert a == b and a != c


def test_resumed_sampler_continues_the_same_sequence():
    full = take(MixedBatchSampler(9, 30, 1, 4, seed=2), 12)
    first = MixedBatchSampler(9, 30, 1, 4, seed=2)
    head = take(first, 5)
    resumed = MixedBatchSampler(9, 30, 1, 4, seed=2)
    resumed.load_state_dict(first.state_dict())
    assert head + take(resumed, 7) == full


def test_ranks_draw_disjoint_positions_of_one_global_stream():
    single = take(MixedBatchSampler(40, 0, 2, 0, seed=1, world_size=1), 10)
    r0 = take(MixedBatchSampler(40, 0, 1, 0, seed=1, rank=0, world_size=2), 10)
    r1 = take(MixedBatchSampler(40, 0, 1, 0, seed=1, rank=1, world_size=2), 10)
    # Within one pass of 40 the 2 ranks' 20 draws are all different images.
    union = [k.index for b in r0 + r1 for k in b]
    assert len(set(union)) == 20
    # Together the ranks draw exactly the global stream of a 1-rank run with the same global batch.
    glob = sorted(k.index for b in single for k in b)
    assert sorted(union) == glob


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unlabeled set is empty"):
        MixedBatchSampler(5, 0, 1, 4)
    with pytest.raises(ValueError, match="rank 2 outside"):
        MixedBatchSampler(5, 5, 1, 1, rank=2, world_size=2)
    s = MixedBatchSampler(5, 5, 1, 1, seed=1)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"batches_drawn": 3, "seed": 2})
