"""Distillation losses. Shapes: student logits ``s`` [B,C], teacher logits ``t`` [M,B,C]
(or [B,C] for one teacher), targets ``y`` [B]. ``T`` is the temperature.

All KL terms are computed from ``log_softmax`` (never ``log(softmax)``) in float32.
Equations follow Hinton et al. (2015) and the official CA-MKD code
(Rorozhl/CA-MKD: ``distiller_zoo/CAMKD.py``, ``helper/loops.py``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


UNLABELLED = -100  # the target of a transfer-set image (labelled_subset): no label to learn from


def labelled_ce(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the batch's labelled samples (target >= 0); zero
    (with zero gradient) when the batch has none. With every sample labelled it is
    exactly ``F.cross_entropy``."""
    labelled = targets >= 0
    if bool(labelled.all()):
        return F.cross_entropy(student_logits.float(), targets)
    ce = F.cross_entropy(student_logits.float(), targets.clamp(min=0), reduction="none")
    return (ce * labelled).sum() / labelled.sum().clamp(min=1)


def consensus_targets(targets: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``targets`` with each unlabelled sample's label replaced by the teachers'
    consensus (the argmax of their mean probability at T = 1): what CAMKD's confidence
    weights measure a teacher against when no label exists."""
    labelled = targets >= 0
    if bool(labelled.all()):
        return targets
    consensus = teacher_logits.detach().float().softmax(-1).mean(0).argmax(-1)
    return torch.where(labelled, targets, consensus)


def kl_per_sample(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, T: float) -> torch.Tensor:
    """KL(p_t || softmax(s/T))[b] * T^2 for teacher log-probabilities already at temperature T."""
    log_q = F.log_softmax(student_logits.float() / T, dim=-1)
    p = teacher_log_probs.exp()
    return (p * (teacher_log_probs - log_q)).sum(-1) * T * T


class DistillKL(nn.Module):
    """Hinton KD: L = T^2 * KL(softmax(t/T) || softmax(s/T)).

    Reduced by the batch mean, or, with per-sample ``weights`` [B], as
    sum_b weights[b] * KL[b] / B.
    """

    def __init__(self, T: float = 4.0):
        super().__init__()
        self.T = T

    def forward(self, student_logits, teacher_logits, weights=None):
        kl = kl_per_sample(student_logits, F.log_softmax(teacher_logits.float() / self.T, -1), self.T)
        return kl.mean() if weights is None else (weights * kl).sum() / kl.shape[0]


def centroid_log_probs(teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """log of the centroid c = (1/M) sum_i softmax(t_i/T), computed with logsumexp: [B,C]."""
    m = teacher_logits.shape[0]
    log_p = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(m)))


def vanilla_kd_loss(student_logits, teacher_logits, T: float) -> torch.Tensor:
    """Vanilla multi-teacher KD: T^2 * KL(c_T || softmax(s/T)), batch mean, where
    c_T = (1/M) sum_i softmax(t_i/T) is the centroid of the softened teachers."""
    return kl_per_sample(student_logits, centroid_log_probs(teacher_logits, T), T).mean()


def camkd_weights(teacher_logits: torch.Tensor, targets: torch.Tensor, detach: bool = True) -> torch.Tensor:
    """CA-MKD confidence weights [M,B]: w[i,b] = (1 - softmax_i(CE_i[b])) / (M - 1).

    CE_i[b] is teacher i's cross-entropy on sample b at T = 1; a more confident
    (lower-loss) teacher gets a larger weight. Each column sums to 1. Detached by
    default: the weights are a confidence measure, not something the student may
    optimise. ``detach=False`` keeps the graph (the official feature weights, whose
    logits come from the teachers' heads on the student's mapped features).
    """
    m, b, c = teacher_logits.shape
    if m < 2:
        raise ValueError(f"CAMKD needs at least 2 teachers, got {m}")
    logits = teacher_logits.detach() if detach else teacher_logits
    ce = F.cross_entropy(logits.float().reshape(m * b, c), targets.repeat(m), reduction="none").view(m, b)
    return (1.0 - F.softmax(ce, dim=0)) / (m - 1)


def camkd_logit_loss(student_logits, teacher_logits, targets, T: float, official: bool = False):
    """CAMKD logit term: (1/B) sum_b sum_i w[i,b] * T^2 * KL(softmax(t_i/T) || softmax(s/T))[b].

    Returns ``(loss, weights)``. The official code divides by an extra M
    (``/(1.0*bsz*opt.teacher_num)``, ``helper/loops.py`` line 229); we do not, because
    the weights already sum to 1 over teachers: without it, equal weights (1/M) give
    exactly the gradient of vanilla KD, so ``alpha`` means the same for both methods.
    ``official=True`` divides by M as the official code does. In both forms w is a
    constant: the official teachers run under ``torch.no_grad()`` (``loops.py`` lines
    189-194), so its ``attention`` (line 224) carries no gradient either, and its KL is
    ours (``DistillKL(is_ca=True)``, ``distiller_zoo/KD.py`` line 17: per-sample sum
    over classes times T^2).
    """
    w = camkd_weights(teacher_logits, targets)
    kl = kl_per_sample(student_logits.unsqueeze(0), F.log_softmax(teacher_logits.float() / T, -1), T)
    loss = (w * kl).sum(0).mean()
    return (loss / w.shape[0] if official else loss), w


def grouped_feature_mse(mapped: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample mean squared error of k teachers' feature maps at once: [k,B].

    ``mapped`` [B, C_1+...+C_k, H, W] is a fused regressor's output (``ConvRegs``),
    ``targets`` the k teachers' maps [B, C_i, H, W]. One subtraction over the whole
    concatenation, then per-teacher sums of the squares, divided by C_i*H*W: fewer,
    contiguous passes than k separate MSEs on channel slices. The sums run over the
    trailing dims in place, so a channels_last input is not copied first.
    """
    target = torch.cat([t.float() for t in targets], dim=1)  # fp32 first: autocast's cat refuses fp16 on CPU
    squares = (mapped.float() - target).pow(2).sum(dim=tuple(range(2, mapped.ndim)))
    per_teacher = squares.split([t.shape[1] for t in targets], dim=1)
    return torch.stack([s.sum(1) / t[0].numel() for s, t in zip(per_teacher, targets)])


def camkd_feature_loss(mse: torch.Tensor, head_logits: torch.Tensor, targets: torch.Tensor,
                       official: bool = False):
    """CAMKD feature term: (1/B) sum_b sum_i v[i,b] * MSE(r_i(f_s), f_t_i)[b].

    ``mse`` [M,B] is the per-sample MSE between the mapped student feature r_i(f_s)
    (r_i the student-to-teacher-i regressor) and teacher i's feature;
    v = camkd_weights(head_logits, y), where ``head_logits`` [M,B,C] is teacher i's
    own head applied to r_i(f_s) (as ``CalWeight.forward`` does with
    ``distill_seq()[-1]``, ``models/util.py`` line 79). Returns ``(loss, weights)``.

    kdbook form (default), deliberately unlike the official code: no extra 1/M (see
    ``camkd_logit_loss``), and v is detached, so the regressors cannot lower the loss
    by making a teacher's head misclassify the mapped features.

    ``official=True`` is ``distiller_zoo/CAMKD.py`` (lines 21-32): the sum divided by
    ``bsz * num_teacher``, and v is *not* detached. There the head logits come from
    ``CalWeight`` outside any ``no_grad`` and nothing in ``CAMKD.forward`` detaches them,
    so the loss is differentiated through the softmax over the heads' cross-entropies
    into the regressors and the student. Pass ``head_logits`` with their graph for that;
    the weights returned then carry it too (detach them before logging).
    """
    v = camkd_weights(head_logits, targets, detach=not official)
    loss = (v * mse).sum(0).mean()
    return (loss / v.shape[0] if official else loss), v
