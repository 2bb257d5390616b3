"""Fidelity metrics against an independent numpy/scipy computation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from kdlib.train.metrics import accuracy, agreement, fidelity_metrics, kl_divergence

M, N, C = 3, 50, 5
KEYS = {"individual_fidelity", "mean_individual_fidelity", "centroid_fidelity", "teacher_diversity",
        "pairwise_diversity", "top1_agreement", "centroid_agreement"}


@pytest.fixture(scope="module")
def probs():
    rng = np.random.default_rng(0)
    teachers = rng.dirichlet(np.full(C, 0.7), size=(M, N)).astype(np.float32)   # [M,N,C]
    student = rng.dirichlet(np.full(C, 0.7), size=N).astype(np.float32)         # [N,C]
    return teachers, student


def np_kl(p, q):
    """mean over samples of KL(p || q); scipy's entropy(p, q) = sum p log(p / q) after
    renormalising p and q (float32 rows sum to 1 only to ~1e-7, hence rel=1e-6 below)."""
    return float(entropy(p.astype(np.float64), q.astype(np.float64), axis=-1).mean())


def test_fidelity_metrics_against_numpy(probs):
    tp, sp = probs
    got = fidelity_metrics(torch.from_numpy(tp), torch.from_numpy(sp))
    assert set(got) == KEYS
    json.dumps(got)   # plain Python numbers
    centroid = tp.astype(np.float64).mean(0)
    indiv = [np_kl(tp[i], sp) for i in range(M)]
    assert got["individual_fidelity"] == pytest.approx(indiv, rel=1e-6)
    assert got["mean_individual_fidelity"] == pytest.approx(np.mean(indiv), rel=1e-6)
    assert got["centroid_fidelity"] == pytest.approx(np_kl(centroid, sp), rel=1e-6)
    assert got["teacher_diversity"] == pytest.approx([np_kl(tp[i], centroid) for i in range(M)], rel=1e-6)
    pair = np.array(got["pairwise_diversity"])
    assert pair.shape == (M, M)
    for i in range(M):
        for j in range(M):
            assert pair[i, j] == pytest.approx(np_kl(tp[i], tp[j]), rel=1e-6, abs=1e-9)
    s_arg = sp.argmax(-1)
    assert got["top1_agreement"] == pytest.approx([100.0 * np.mean(s_arg == tp[i].argmax(-1)) for i in range(M)])
    assert got["centroid_agreement"] == pytest.approx(100.0 * np.mean(s_arg == centroid.argmax(-1)))
    # sanity of the random case itself: the metrics are not trivially 0 or 100
    assert min(indiv) > 0.1 and 0 < got["centroid_agreement"] < 100
    # Jensen: KL(C||S) <= mean_i KL(T_i||S) (KL is convex in its first argument)
    assert got["centroid_fidelity"] <= got["mean_individual_fidelity"]


def test_kl_of_equal_distributions_is_zero(probs):
    tp, _ = probs
    p = torch.from_numpy(tp[0])
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(N, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (kl_divergence(p, torch.from_numpy(tp[1])) > 0).all()


def test_student_equal_to_a_teacher(probs):
    tp, _ = probs
    got = fidelity_metrics(torch.from_numpy(tp), torch.from_numpy(tp[1]))
    assert got["individual_fidelity"][1] == pytest.approx(0.0, abs=1e-12)
    assert got["individual_fidelity"][0] > 0 and got["individual_fidelity"][2] > 0
    assert got["top1_agreement"][1] == 100.0
    assert agreement(torch.from_numpy(tp[1]), torch.from_numpy(tp[1])) == 100.0


def test_pairwise_diagonal_zero_and_not_symmetric(probs):
    tp, sp = probs
    pair = np.array(fidelity_metrics(torch.from_numpy(tp), torch.from_numpy(sp))["pairwise_diversity"])
    np.testing.assert_allclose(np.diag(pair), 0.0, atol=1e-12)
    assert (pair[~np.eye(M, dtype=bool)] > 0).all()
    assert not np.allclose(pair, pair.T)           # KL is not symmetric; i,j not swapped silently


def test_zero_probabilities_handled():
    # 0 log 0 = 0: KL([1,0] || [.5,.5]) = log 2
    assert kl_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])).item() == pytest.approx(np.log(2))
    # q = 0 where p > 0: floored at 1e-12, large but finite
    v = kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])).item()
    assert np.isfinite(v)
    assert v == pytest.approx(0.5 * np.log(0.5) + 0.5 * (np.log(0.5) - np.log(1e-12)), rel=1e-6)


@pytest.mark.parametrize("t_shape,s_shape", [((N, C), (N, C)),            # teachers 2-D
                                             ((M, N, C), (M, N, C)),      # student 3-D
                                             ((M, N, C), (N + 1, C)),     # N mismatch
                                             ((M, N, C), (N, C + 1))])    # C mismatch
def test_bad_shapes_raise(t_shape, s_shape):
    with pytest.raises(ValueError, match=r"expected teacher_probs \[M,N,C\]"):
        fidelity_metrics(torch.full(t_shape, 1.0 / C), torch.full(s_shape, 1.0 / C))


def test_accuracy():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0], [5.0, 4.0]])
    assert accuracy(logits, torch.tensor([1, 0, 0, 1])) == 50.0
    assert accuracy(logits, torch.tensor([1, 0, 1, 0])) == 100.0
