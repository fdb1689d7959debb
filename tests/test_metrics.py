"""trainer/metrics.py: the streaming bucketed AUC against the exact one, merged halves and a real
two-process ``torch.distributed`` all_reduce; GAUC against a plain-Python reference."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from trainer.metrics import BucketedAUC, gauc, roc_auc


def scored(n: int, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(np.float32)
    scores = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * labels)))
    if ties:
        scores = np.round(scores, 2)
    return labels, scores


@pytest.mark.unit
@pytest.mark.parametrize("ties", [False, True])
def test_bucketed_auc_is_within_1e_3_of_the_exact_auc_at_10k_buckets(ties):
    labels, scores = scored(200_000, ties=ties)
    auc = BucketedAUC(10_000)
    for start in range(0, labels.shape[0], 4096):  # streamed batch by batch
        auc.update(labels[start : start + 4096], scores[start : start + 4096])
    assert auc.samples == labels.shape[0]
    assert abs(auc.value() - roc_auc(labels, scores)) < 1e-3
    coarse = BucketedAUC(4)
    coarse.update(labels, scores)
    assert abs(coarse.value() - roc_auc(labels, scores)) > 1e-3  # the bound is the buckets' doing


@pytest.mark.unit
def test_bucketed_auc_with_one_score_per_bucket_equals_the_pairwise_count(pairwise_auc):
    labels = np.array([0, 1, 0, 1, 1, 0, 0])
    scores = np.array([0.05, 0.95, 0.35, 0.35, 0.75, 0.55, 0.15])  # bucket = first decimal; a tie at 0.35
    auc = BucketedAUC(10)
    auc.update(labels, scores)
    assert auc.value() == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


@pytest.mark.unit
def test_merging_two_halves_equals_the_whole():
    labels, scores = scored(50_000, seed=3)
    whole, first, second = BucketedAUC(1000), BucketedAUC(1000), BucketedAUC(1000)
    whole.update(labels, scores)
    first.update(labels[::2], scores[::2])
    second.update(labels[1::2], scores[1::2])
    merged = first.merge(second)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.value() == whole.value()
    with pytest.raises(ValueError, match="cannot merge an AUC of 10 buckets into one of 1000"):
        merged.merge(BucketedAUC(10))


@pytest.mark.unit
def test_bucketed_auc_of_one_class_is_nan_and_bad_input_is_refused():
    auc = BucketedAUC(100)
    auc.update(np.ones(5), np.linspace(0, 1, 5))
    assert np.isnan(auc.value())
    with pytest.raises(ValueError, match=r"labels \(2\) and scores \(3\) differ in size"):
        auc.update(np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="buckets must be >= 2, got 1"):
        BucketedAUC(1)


@pytest.mark.process  # two real processes joined by torch.distributed (gloo)
def test_all_reduce_over_two_ranks_gives_each_the_auc_of_both_shares(tmp_path):
    labels, scores = scored(20_000, seed=5)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "scores.npy", scores)
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        import torch.distributed as dist
        from trainer.metrics import BucketedAUC
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path}/rendezvous", rank=rank, world_size=2)
        labels, scores = np.load("{tmp_path}/labels.npy"), np.load("{tmp_path}/scores.npy")
        auc = BucketedAUC(10_000)
        auc.update(labels[rank::2], scores[rank::2])
        mine = auc.samples
        auc.all_reduce()
        print(json.dumps({{"mine": mine, "samples": auc.samples, "auc": auc.value()}}))
        dist.destroy_process_group()
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for rank in (0, 1)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    whole = BucketedAUC(10_000)
    whole.update(labels, scores)
    assert [o["mine"] for o in outputs] == [10_000, 10_000]
    assert all(o["samples"] == 20_000 and o["auc"] == whole.value() for o in outputs)
    assert abs(whole.value() - roc_auc(labels, scores)) < 1e-3


@pytest.mark.unit
@pytest.mark.parametrize("weight", ["impressions", "clicks"])
def test_gauc_equals_a_plain_python_reference(weight, pairwise_gauc):
    rng = np.random.default_rng(11)
    n = 3000
    groups = rng.integers(0, 150, n).astype(np.uint64) * np.uint64(2**40)  # ids beyond float64's exact range
    labels = (rng.random(n) < 0.25).astype(np.float32)
    scores = np.round(rng.random(n) * 0.6 + 0.4 * labels, 2)  # ties within groups
    got = gauc(labels, scores, groups, weight)
    assert got == pytest.approx(pairwise_gauc(labels, scores, groups.tolist(), weight), abs=1e-12)
    assert got != pytest.approx(roc_auc(labels, scores), abs=1e-4)  # it is not the global AUC


@pytest.mark.unit
def test_gauc_skips_groups_of_one_class_and_weighs_by_size_or_clicks():
    labels = np.array([0, 1, 1, 0, 1, 1, 1, 0, 0])
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.5, 0.6, 0.4, 0.7])
    groups = np.array(["u1", "u1", "u2", "u2", "u2", "u3", "u3", "u4", "u4"])
    # u1: AUC 1 (2 samples, 1 click); u2: 0 (3 samples, 2 clicks); u3, u4: one class, skipped.
    assert gauc(labels, scores, groups, "impressions") == pytest.approx((2 * 1.0 + 3 * 0.0) / 5)
    assert gauc(labels, scores, groups, "clicks") == pytest.approx((1 * 1.0 + 2 * 0.0) / 3)
    assert np.isnan(gauc(labels[5:], scores[5:], groups[5:]))
    with pytest.raises(ValueError, match="weight must be one of impressions, clicks, got 'users'"):
        gauc(labels, scores, groups, "users")
    with pytest.raises(ValueError, match="differ in size"):
        gauc(labels, scores, groups[:3])
