"""Fidelity metrics: how closely a student follows its teachers (after gnosis).

Inputs are probabilities at T = 1 on the test set: teachers ``[M,N,C]``, student
``[N,C]``. Every KL is KL(p || q) = sum_c p_c (log p_c - log q_c), averaged over
samples; 0 log 0 is taken as 0 and q is floored at 1e-12 so a probability that
underflowed to zero gives a large finite value instead of inf.
"""
from __future__ import annotations

import torch

EPS = 1e-12


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p || q) over the last axis (broadcasting)."""
    p, q = p.double(), q.double()
    kl = (torch.special.xlogy(p, p) - p * torch.log(q.clamp_min(EPS))).sum(-1)
    return kl.clamp_min(0.0)  # rounding can leave -1e-20 where p == q


def agreement(a_probs: torch.Tensor, b_probs: torch.Tensor) -> float:
    """Percent of samples whose argmax classes agree."""
    return 100.0 * (a_probs.argmax(-1) == b_probs.argmax(-1)).double().mean().item()


def fidelity_metrics(teacher_probs: torch.Tensor, student_probs: torch.Tensor) -> dict:
    """Fidelity, diversity and agreement of a student and M teachers.

    Returns plain Python numbers (JSON-ready):
    ``individual_fidelity`` [M]: KL(T_i || S); ``centroid_fidelity``: KL(C || S) with
    C = (1/M) sum_i T_i; ``mean_individual_fidelity``: mean of the individual ones;
    ``teacher_diversity`` [M]: KL(T_i || C); ``pairwise_diversity`` [M][M]:
    KL(T_i || T_j); ``top1_agreement`` [M]: % argmax S == argmax T_i;
    ``centroid_agreement``: % argmax S == argmax C.
    """
    if teacher_probs.ndim != 3 or student_probs.ndim != 2 or teacher_probs.shape[1:] != student_probs.shape:
        raise ValueError(f"expected teacher_probs [M,N,C] and student_probs [N,C], got "
                         f"{tuple(teacher_probs.shape)} and {tuple(student_probs.shape)}")
    centroid = teacher_probs.double().mean(0)
    individual = kl_divergence(teacher_probs, student_probs.unsqueeze(0)).mean(1)
    pairwise = kl_divergence(teacher_probs.unsqueeze(1), teacher_probs.unsqueeze(0)).mean(-1)
    return {
        "individual_fidelity": individual.tolist(),
        "mean_individual_fidelity": individual.mean().item(),
        "centroid_fidelity": kl_divergence(centroid, student_probs).mean().item(),
        "teacher_diversity": kl_divergence(teacher_probs, centroid.unsqueeze(0)).mean(1).tolist(),
        "pairwise_diversity": pairwise.tolist(),
        "top1_agreement": [agreement(student_probs, t) for t in teacher_probs],
        "centroid_agreement": agreement(student_probs, centroid),
    }


def accuracy(logits_or_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits_or_probs.argmax(-1) == labels).double().mean().item()


def confidently_wrong(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.9) -> float:
    """Percent of samples a model gets wrong with confidence: argmax != label and the
    argmax's probability above ``threshold``. ``probs`` [N,C] at T = 1."""
    top, predicted = probs.max(-1)
    return 100.0 * ((predicted != labels) & (top > threshold)).double().mean().item()


def weights_by_correctness(weights: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """How a method weighs each teacher where that teacher is right and where it is wrong.

    ``weights`` [M,N]: the per-image teacher weights the method's loss uses;
    ``teacher_logits`` [M,N,C]; ``labels`` [N], the true labels. Returns lists over the
    M teachers (JSON-ready): ``mean`` (over all images), ``wrong`` and ``right`` (mean
    weight on the images where the teacher's argmax differs from / equals the label;
    None where there are none) and ``wrong_share`` (% of images it gets wrong).
    """
    if weights.shape != teacher_logits.shape[:2] or teacher_logits.shape[1] != labels.shape[0]:
        raise ValueError(f"expected weights [M,N], teacher_logits [M,N,C], labels [N], got {tuple(weights.shape)}, "
                         f"{tuple(teacher_logits.shape)}, {tuple(labels.shape)}")
    weights = weights.double()
    wrong = teacher_logits.argmax(-1) != labels.unsqueeze(0)

    def mean_where(mask):
        return [w[m].mean().item() if m.any() else None for w, m in zip(weights, mask)]

    return {"mean": weights.mean(1).tolist(), "wrong": mean_where(wrong), "right": mean_where(~wrong),
            "wrong_share": (100.0 * wrong.double().mean(1)).tolist()}
