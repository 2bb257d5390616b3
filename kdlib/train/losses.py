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


def labelled_ce(student_logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the batch's labelled samples (target >= 0); zero
    (with zero gradient) when the batch has none. With every sample labelled it is
    exactly ``F.cross_entropy(..., label_smoothing=label_smoothing)`` (Szegedy et al.
    2016: the target is (1 - eps) one-hot + eps uniform over the classes)."""
    labelled = targets >= 0
    if bool(labelled.all()):
        return F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)
    ce = F.cross_entropy(student_logits.float(), targets.clamp(min=0), reduction="none",
                         label_smoothing=label_smoothing)
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


# ---------------------------------------------------------------- the CA-MKD paper's multi-teacher baselines
# Official code: Rorozhl/CA-MKD, helper/loops.py (train_distill_multi_teacher), helper/optimization.py
# (find_optimal_svm), distiller_zoo/KD.py (DistillKL), train_student.py (nu).

def per_teacher_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 KL(softmax(t_i/T) || softmax(s/T))[b] for every teacher and sample: [M,B]
    (``DistillKL(is_ca=True)``, ``distiller_zoo/KD.py`` lines 13-17)."""
    return kl_per_sample(student_logits.unsqueeze(0), F.log_softmax(teacher_logits.float() / T, -1), T)


def aver_kd_loss(student_logits, teacher_logits, T: float) -> torch.Tensor:
    """AVER: (1/M) sum_i T^2 KL(softmax(t_i/T) || softmax(s/T)), each KL a batch mean
    (the ``AVERAGE_LOSS`` branch, ``helper/loops.py`` lines 200-203, with ``DistillKL``'s
    ``batchmean``, ``distiller_zoo/KD.py`` line 19).

    Its gradient in the student logits is vanilla KD's, for any teachers: both are
    (T/B) (softmax(s/T) - c_T) with c_T the mean of the softened teachers, because
    the mean of KL(p_i || q) and KL(c_T || q) differ only by terms without q (the
    teachers' generalised Jensen-Shannon divergence, T^2 JS, a constant to the student).
    The two losses differ by that constant; they train the same way."""
    return per_teacher_kl(student_logits, teacher_logits, T).mean()


def entropy_weights(teacher_logits: torch.Tensor) -> torch.Tensor:
    """EBKD's per-sample teacher weights [M,B]: w[i,b] = 1 - H_i[b] / sum_j H_j[b], with
    H_i teacher i's entropy at T = 1 (``helper/loops.py`` lines 207-215). A more certain
    (lower-entropy) teacher weighs more; each column sums to M - 1. Detached, as the
    official teachers run under ``no_grad``.

    Differs from the official code only where it would fail: the entropy comes from
    ``log_softmax`` (the official ``softmax * log(softmax)`` gives NaN where a
    probability underflows to 0), and a sample on which every teacher is certain
    (all H_i = 0, where the official code divides 0 by 0) gets equal weights (M-1)/M."""
    log_p = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    h = -(log_p.exp() * log_p).sum(-1)
    total = h.sum(0, keepdim=True)
    m = h.shape[0]
    return torch.where(total > 0, 1.0 - h / total.clamp(min=torch.finfo(h.dtype).tiny),
                       torch.full_like(h, (m - 1) / m))


def ebkd_loss(student_logits, teacher_logits, T: float):
    """EBKD: sum_b sum_i w[i,b] T^2 KL(softmax(t_i/T) || softmax(s/T))[b] / (B M),
    w = ``entropy_weights`` (``helper/loops.py`` lines 204-219: the per-sample KLs of
    ``DistillKL(is_ca=True)`` weighted, summed and divided by ``bsz * teacher_num``).
    Returns ``(loss, weights)``. The weights sum to M - 1, so with equally certain
    teachers each weighs (M-1)/M^2: the loss is then (M-1)/M times AVER's."""
    w = entropy_weights(teacher_logits)
    kl = per_teacher_kl(student_logits, teacher_logits, T)
    return (w * kl).sum() / kl.numel(), w


AEKD_C = 0.6  # train_student.py line 91: '-C', default 0.6, "tolerance for disagreement among teachers"


def aekd_nu(m: int, c: float = AEKD_C) -> float:
    """The one-class SVM's nu for M teachers: 1/(C M) (``train_student.py`` line 142),
    clamped to [1/M, 1] as ``find_optimal_svm`` does (``helper/optimization.py`` lines 25-30)."""
    return min(1.0, max(1.0 / m, 1.0 / (c * m)))


def kd_logit_gradients(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """d/ds of each teacher's batch-mean T^2 KL(softmax(t_i/T) || softmax(s/T)), in closed
    form: T (softmax(s/T) - softmax(t_i/T)) / B, [M,B,C] float32, no graph.

    What the official AEKD branch collects with a hook on the student logits and one
    extra backward pass per teacher (``helper/loops.py`` lines 233-239); the derivative
    of -sum_c p_c log softmax(s/T)_c in s is (softmax(s/T) - p)/T, times T^2/B."""
    s = student_logits.detach().float()
    q = F.softmax(s / T, dim=-1)
    p = F.softmax(teacher_logits.detach().float() / T, dim=-1)
    return T * (q.unsqueeze(0) - p) / s.shape[0]


def svm_teacher_weights(grads: torch.Tensor, nu: float) -> torch.Tensor:
    """AEKD's teacher weights [M] from per-teacher gradients [M,B,...]: ``find_optimal_svm``
    with its defaults (``helper/optimization.py`` lines 16-57; ``is_norm`` is the
    ``--svm_norm`` flag, off by default, ``train_student.py`` line 93, and off in the
    published AEKD command, ``scripts/run.sh``).

    Each teacher's gradient is averaged over the batch (lines 18-19), the Gram matrix of
    those M vectors (line 23) goes to scikit-learn's ``OneClassSVM(kernel="precomputed",
    nu, tol=1e-6)`` (line 39), and the weights are the dual coefficients of its support
    vectors divided by M nu (line 49), zero for the others. libsvm's dual has
    0 <= a_i <= 1 and sum_i a_i = nu M, so the weights are non-negative, sum to 1 and are
    at most 1/(nu M): the minimum-norm point of the teachers' gradients' convex hull,
    with each weight capped (at C = 0.6 for the default nu).

    libsvm starts from a = (1, nu M - 1, 0, ...) and stops once its optimality gap is
    under tol. KD gradients are small (Gram entries ~1e-7 to 1e-6 at batch 128, less as
    the student nears its teachers), so it often stops at once: weights (0.6, 0.4, 0, ...)
    on the first two teachers, whatever they say. The official code does the same; we
    do not rescale (``docs/methods-baselines.md``)."""
    from sklearn.svm import OneClassSVM  # imported here: only AEKD needs it

    m = grads.shape[0]
    vec = grads.reshape(m, grads.shape[1], -1).mean(1).detach().float().cpu().numpy()
    gram = vec @ vec.T  # float32, as the official torch.matmul; in numpy, so no autocast makes it bf16
    svm = OneClassSVM(kernel="precomputed", nu=nu, tol=1e-6).fit(gram)
    weights = torch.zeros(m)
    weights[torch.as_tensor(svm.support_)] = torch.as_tensor(svm.dual_coef_[0] / (m * nu), dtype=torch.float32)
    return weights


def aekd_loss(student_logits, teacher_logits, T: float, nu: float | None = None):
    """AEKD: sum_i lambda_i T^2 KL(softmax(t_i/T) || softmax(s/T)), each KL a batch mean,
    lambda = ``svm_teacher_weights`` of the KLs' logit gradients (``kd_logit_gradients``),
    a constant to the student (``helper/loops.py`` lines 230-249). ``nu`` defaults to
    ``aekd_nu(M)``. Returns ``(loss, lambda [M])``."""
    m = teacher_logits.shape[0]
    lam = svm_teacher_weights(kd_logit_gradients(student_logits, teacher_logits, T), nu or aekd_nu(m))
    kl = per_teacher_kl(student_logits, teacher_logits, T).mean(1)
    return (lam.to(kl.device) * kl).sum(), lam.to(kl.device)
