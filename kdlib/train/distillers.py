"""One small class per training method (after mdistiller's ``Distiller``).

``forward_train(x, y, idx, epoch)`` returns ``(student_logits, losses)`` where
``losses`` maps a term's name to its already-weighted value; the trainer sums the
terms and logs each by name, and never branches on the method. Teachers are held
in a bank (``kdlib.train.teachers``) that stays in eval mode whatever ``.train()`` says.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .losses import (aekd_loss, aver_kd_loss, camkd_feature_loss, camkd_logit_loss, camkd_weights,
                     consensus_targets, ebkd_loss, entropy_weights, grouped_feature_mse, labelled_ce,
                     vanilla_kd_loss)
from .models import CalWeight, ConvRegs, StagedNet
from .teachers import LiveTeachers


class Distiller(nn.Module):
    """Base class: a student and, optionally, a bank of frozen teachers.

    ``y`` may hold ``UNLABELLED`` (-100) for transfer-set images (``labelled_subset``):
    the cross-entropy then averages over the labelled samples only, and the
    distillation terms still use every sample. ``idx`` is the teacher bank's row key."""

    learns_from_teachers = True  # False: trains on the labelled images only
    min_teachers = 0  # fewer are refused, by kdlib.params before anything runs and by the constructor
    teachers_why = ""  # why, when the reason is not plain

    def __init__(self, student: StagedNet, teachers: LiveTeachers | None = None):
        super().__init__()
        self.student = student
        self.teachers = teachers
        self.batch_stats: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teachers is not None:
            self.teachers.train(False)  # re-asserted on every call
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters plus the method's own (e.g. ConvReg regressors)."""
        return list(self.student.parameters()) + self.extra_parameters()

    def extra_module(self) -> nn.Module:
        """The method's own trained parts (CAMKD's regressors); checkpointed with the student."""
        return nn.ModuleList()

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.extra_module().parameters())

    def forward(self, x):
        return self.student(x)

    def forward_train(self, x, y, idx, epoch: int):
        raise NotImplementedError

    def teacher_weights(self, x, y, idx) -> torch.Tensor | None:
        """The per-image teacher weights [M,B] as this method's loss uses them on batch
        ``x`` (labels ``y``, bank keys ``idx``), or None for a method without any.
        Called without gradients, in eval mode, after training (``kdlib.train``)."""
        return None


class Scratch(Distiller):
    """The student alone: L = CE(s, y)."""

    learns_from_teachers = False

    def forward_train(self, x, y, idx, epoch):
        logits = self.student(x)
        return logits, {"ce": labelled_ce(logits, y)}


class LabelSmoothing(Distiller):
    """The student alone with smoothed labels (Szegedy et al. 2016), a teacher-free
    control for the soft targets of KD: L = CE_eps(s, y), the target (1 - eps) one-hot
    + eps uniform over the classes (``F.cross_entropy(..., label_smoothing=eps)``). Trains
    as scratch does (the labelled images only under ``labelled_subset``, where unlabelled
    targets are skipped as ``labelled_ce`` does); eps = 0 is scratch exactly."""

    learns_from_teachers = False

    def __init__(self, student, teachers=None, label_smoothing=0.1):
        super().__init__(student, teachers)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.eps = label_smoothing

    def forward_train(self, x, y, idx, epoch):
        logits = self.student(x)
        return logits, {"ce": labelled_ce(logits, y, self.eps)}


class LogitKD(Distiller):
    """A method that learns from the teachers' logits alone: temperature T, weight alpha
    of its KD term ``kd``; every sample, labelled or not, is distilled."""

    min_teachers = 1

    def __init__(self, student, teachers, temperature=4.0, alpha=0.7):
        super().__init__(student, teachers)
        check_teachers(type(self), len(teachers))
        self.T, self.alpha = temperature, alpha

    def kd_term(self, logits, t_logits):
        """``(kd, weights)``: the KD term, and each teacher's mean weight in it over the
        batch [M] (logged per epoch as ``weight``), or None for a method without weights."""
        raise NotImplementedError

    def forward_train(self, x, y, idx, epoch):
        logits = self.student(x)
        kd, weights = self.kd_term(logits, self.teachers.logits(x, idx))
        if weights is not None:
            self.batch_stats = {"weight": weights}
        return logits, {"ce": labelled_ce(logits, y), "kd": self.alpha * kd}


class Vanilla(LogitKD):
    """Vanilla multi-teacher KD (equal weights 1/M, logits only):
    L = CE(s, y) + alpha * T^2 * KL(c_T || softmax(s/T)), c_T = (1/M) sum_i softmax(t_i/T)."""

    def kd_term(self, logits, t_logits):
        return vanilla_kd_loss(logits, t_logits, self.T), None


class Aver(LogitKD):
    """AVER, the CA-MKD paper's averaging baseline: the mean of the teachers' KL terms,
    L = CE(s, y) + alpha * (1/M) sum_i T^2 KL(softmax(t_i/T) || softmax(s/T)), batch mean
    (``AVERAGE_LOSS``, Rorozhl/CA-MKD ``helper/loops.py`` lines 200-203, ``DistillKL``
    ``distiller_zoo/KD.py`` line 19; ``kdlib.losses.aver_kd_loss``).

    Against ``vanilla``, which takes one KL to the mean distribution c_T: the mean of
    KLs exceeds the KL to the mean by the teachers' Jensen-Shannon divergence (times
    T^2), which does not depend on the student, so the gradient, and hence training, is
    the same as vanilla's; only the logged ``kd`` value is larger. One teacher is
    allowed (the official code trains a single teacher with this branch,
    ``train_student.py`` lines 137-138)."""

    def kd_term(self, logits, t_logits):
        return aver_kd_loss(logits, t_logits, self.T), None


class EBKD(LogitKD):
    """Entropy-based KD, as the CA-MKD paper's EBKD baseline (``helper/loops.py`` lines
    204-219): L = CE(s, y) + alpha * sum_b sum_i w[i,b] T^2 KL(softmax(t_i/T) ||
    softmax(s/T))[b] / (B M), with w[i,b] = 1 - H_i[b] / sum_j H_j[b] and H_i teacher
    i's entropy at T = 1 (``kdlib.losses.entropy_weights``, ``ebkd_loss``): a more
    certain teacher weighs more. The weights need no label, so transfer-set images are
    weighted like any other. Each column of w sums to M - 1 (not 1), and the loss
    divides by B M as the official code does: with equally certain teachers each KL
    weighs (M-1)/M^2, (M-1)/M of AVER's 1/M."""

    min_teachers = 2
    teachers_why = "with one teacher its weight 1 - H/H is 0 and nothing is distilled"

    def kd_term(self, logits, t_logits):
        kd, w = ebkd_loss(logits, t_logits, self.T)
        return kd, w.mean(1)

    def teacher_weights(self, x, y, idx):
        """w [M,B] exactly as the loss uses it (each column sums to M - 1; the loss
        divides by B M), not normalised to sum to 1."""
        return entropy_weights(self.teachers.logits(x, idx))


class AEKD(LogitKD):
    """Adaptive ensemble KD in gradient space (Du et al., NeurIPS 2020), as the CA-MKD
    paper's AEKD baseline (``helper/loops.py`` lines 230-249): L = CE(s, y) + alpha *
    sum_i lambda_i T^2 KL(softmax(t_i/T) || softmax(s/T)), each KL a batch mean, with
    one weight per teacher and batch: lambda solves a one-class SVM on the Gram matrix of
    the teachers' KL gradients in the student logits (``kdlib.losses.aekd_loss``,
    ``svm_teacher_weights``; nu = 1/(0.6 M), ``train_student.py`` line 142), so it is
    the smallest-norm combination of those gradients with each lambda_i <= 0.6.

    The official code gets the gradients with a hook and one extra backward pass through
    the student per teacher; here they come in closed form (``kd_logit_gradients``), the
    same numbers without the passes (tested against autograd). No label is needed."""

    min_teachers = 2
    teachers_why = "with one teacher its SVM weight is always 1, which is single-teacher KD"

    def kd_term(self, logits, t_logits):
        return aekd_loss(logits, t_logits, self.T)

    def teacher_weights(self, x, y, idx):
        """The batch's lambda [M] broadcast to [M,B]: one weight per teacher and batch,
        so an image's weights depend on the batch it is in (the student's current logits
        on every image of it)."""
        t_logits = self.teachers.logits(x, idx)
        lam = aekd_loss(self.student(x), t_logits, self.T)[1]
        return lam.unsqueeze(1).expand(-1, len(x))


class CAMKD(Distiller):
    """Confidence-aware multi-teacher KD (Zhang, Chen, Wang, ICASSP 2022):
    L = CE(s, y) + alpha * L_logit + beta * L_feat, with

    * L_logit = (1/B) sum_b sum_i w[i,b] T^2 KL(softmax(t_i/T) || softmax(s/T))[b],
      w = camkd_weights(t, y) = (1 - softmax_i(CE(t_i, y))) / (M-1);
    * L_feat = (1/B) sum_b sum_i v[i,b] MSE(r_i(f_s), f_t_i)[b], r_i a ``ConvReg`` per
      teacher, v = camkd_weights(head_i(r_i(f_s)), y); zero in the first epoch, as in
      the official ``helper/loops.py``.

    See ``kdlib.train.losses`` for where we differ from the official code and why.

    ``form="official"`` (params ``camkd_form: official``) is the loss of the official
    code (Rorozhl/CA-MKD), point by point:

    * both terms divided by an extra M (``helper/loops.py`` line 229,
      ``distiller_zoo/CAMKD.py`` line 32);
    * r_i = ``CalWeight``'s resize + ``Embed`` (1x1 conv, BN, ReLU), not ``ConvReg``
      (``models/util.py`` lines 53-81, 114-141); ``extra_module()`` is that
      ``CalWeight`` (state_dict keys ``embed<i>.transfer.*``);
    * v is not detached: the heads run on r_i(f_s) with their graph, so the loss is
      differentiated through v into the regressors and the student (as
      ``CalWeight.forward`` + ``CAMKD.forward``); the teachers' own parameters stay
      frozen (no gradient), as they are outside the official optimizer;
    * unchanged from kdbook, because the official code does the same: w is a
      constant (the teachers run under ``no_grad``, ``loops.py`` lines 189-194), and
      the feature term is off in the first epoch (``if epoch == 1``, ``loops.py``
      line 304, with epochs counted from 1, ``train_student.py`` line 348). The
      official loop still runs ``CalWeight`` in that epoch (updating only its BN
      running statistics, which no loss or evaluation reads); we skip it.
    * ``hint_layer`` is kept (the official ``inter`` mode always uses ``feat[-2]``,
      ``loops.py`` lines 288-289, our default).

    Outside the loss and not adopted: the official loop skips a last partial batch
    (``loops.py`` lines 178-179).

    Transfer-set images (``labelled_subset``) have no label for the weights to measure
    a teacher against: there, in both forms, the teachers' consensus stands in
    (``kdlib.losses.consensus_targets``); the cross-entropy skips them.
    """

    min_teachers = 2

    def __init__(self, student, teachers, temperature=4.0, alpha=0.7, beta=100.0,
                 hint_layer=-2, feature_shapes=None, student_shape=None, form="kdbook"):
        super().__init__(student, teachers)
        if form not in ("kdbook", "official"):
            raise ValueError(f"unknown camkd_form {form!r}: valid forms are kdbook, official")
        self.form = form
        if len(teachers) < 2:
            raise ValueError(f"camkd needs at least 2 teachers, got {len(teachers)}")
        self.T, self.alpha, self.beta, self.hint_layer = temperature, alpha, beta, hint_layer
        # own models may come without hints: then only beta 0 is possible, and no regressor is built
        self.features = student.has_hint and teachers.has_hints
        if not self.features and beta != 0:
            missing = [n for n, m in zip(teachers.names, teachers.models) if not m.has_hint]
            missing += [] if student.has_hint else ["the student"]
            raise ValueError(f"camkd with beta {beta} matches hint features, and {', '.join(missing)} "
                             "has none: give each own model a hint (the dotted path of a submodule), or beta 0")
        if self.features:
            student.check_hint_layer(hint_layer)
            regressors = CalWeight if form == "official" else ConvRegs
            self.regressors = regressors(student_shape, feature_shapes)
        else:
            self.regressors = nn.ModuleList()

    @classmethod
    def for_shapes(cls, student, teachers, sample: torch.Tensor, **kw):
        """Build with regressors sized from one forward pass on ``sample`` [1,C,H,W]."""
        hint = kw.get("hint_layer", -2)
        if not (student.has_hint and teachers.has_hints):  # refused by the constructor unless beta is 0
            return cls(student, teachers, **kw)
        with torch.no_grad():
            was_training = student.training
            student.eval()
            s_feat = student.hint_forward(sample, hint)[1]
            student.train(was_training)
            _, t_feats = LiveTeachers.outputs(teachers, sample)
        return cls(student, teachers, student_shape=tuple(s_feat.shape[1:]),
                   feature_shapes=[tuple(f.shape[1:]) for f in t_feats], **kw)

    def extra_module(self):
        return self.regressors

    def teacher_weights(self, x, y, idx):
        """The logit term's weights w = camkd_weights(t, y) (both forms), with the
        teachers' consensus standing in for a missing label, as in ``forward_train``."""
        t_logits = self.teachers.logits(x, idx)
        return camkd_weights(t_logits, consensus_targets(y, t_logits))

    def forward_train(self, x, y, idx, epoch):
        if self.features:
            logits, f_s = self.student.hint_forward(x, self.hint_layer)
            t_logits, t_hints = self.teachers.outputs(x, idx)
        else:  # own models without hints, beta 0: the logit term alone
            logits, f_s = self.student(x), None
            t_logits, t_hints = self.teachers.logits(x, idx), None
        official = self.form == "official"
        ce = labelled_ce(logits, y)
        y = consensus_targets(y, t_logits)  # the weights' reference where a sample has no label
        kd, w = camkd_logit_loss(logits, t_logits, y, self.T, official=official)
        losses = {"ce": ce, "kd": self.alpha * kd}
        self.batch_stats = {"weight": w.mean(1)}
        if epoch == 0 or not self.features:
            losses["feat"] = torch.zeros((), device=logits.device)
            return logits, losses
        if official:
            feat, v = self._official_feature_term(f_s, t_hints, y)
            losses["feat"] = self.beta * feat
            self.batch_stats["feat_weight"] = v.detach().mean(1)
            return logits, losses
        mapped = self.regressors(f_s)  # one map per group of same-size teachers
        with torch.no_grad():  # the heads see the mapped maps as constants (detached: no autograd hooks either)
            head_logits = torch.stack([self.teachers.head(i, m.detach()).float()
                                       for i, m in enumerate(self.regressors.split(mapped))])
        mse = torch.stack(self.regressors.in_teacher_order(
            grouped_feature_mse(m, [t_hints[i] for i in members])
            for members, m in zip(self.regressors.members, mapped)))
        feat, v = camkd_feature_loss(mse, head_logits, y)
        losses["feat"] = self.beta * feat
        self.batch_stats["feat_weight"] = v.mean(1)
        return logits, losses

    def _official_feature_term(self, f_s, t_hints, y):
        """``(loss, weights)`` of the official feature term: ``CalWeight``'s maps, the
        teachers' heads on them *with* their graph, v not detached, the extra 1/M."""
        mapped = self.regressors(f_s)
        head_logits = torch.stack([self.teachers.head(i, m).float() for i, m in enumerate(mapped)])
        mse = torch.cat([grouped_feature_mse(m, [h]) for m, h in zip(mapped, t_hints)])
        return camkd_feature_loss(mse, head_logits, y, official=True)


METHODS = {"scratch": Scratch, "vanilla": Vanilla, "camkd": CAMKD, "aver": Aver, "ebkd": EBKD, "aekd": AEKD,
           "label_smoothing": LabelSmoothing}


def check_teachers(method: type[Distiller] | str, m: int) -> None:
    """ValueError unless ``m`` teachers are enough for ``method`` (a name or a class)."""
    cls = METHODS[method] if isinstance(method, str) else method
    if m < cls.min_teachers:
        name = next(k for k, v in METHODS.items() if v is cls)
        why = f" ({cls.teachers_why})" if cls.teachers_why else ""
        raise ValueError(f"{name} needs at least {cls.min_teachers} teachers, got {m}{why}")


def build_distiller(method: str, student: nn.Module, teachers: LiveTeachers | None, sample: torch.Tensor,
                    temperature=4.0, alpha=0.7, beta=100.0, hint_layer=-2, camkd_form="kdbook",
                    label_smoothing=0.1) -> Distiller:
    """The distiller for ``method``; ``sample`` [1,C,H,W] sizes CAMKD's regressors;
    ``camkd_form`` picks CAMKD's loss (``kdbook`` or ``official``); ``label_smoothing``
    is the label_smoothing method's eps."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: valid methods are {', '.join(METHODS)}")
    cls = METHODS[method]
    if method == "scratch":
        return Scratch(student, teachers)
    if method == "label_smoothing":
        return LabelSmoothing(student, teachers, label_smoothing)
    if issubclass(cls, LogitKD):
        return cls(student, teachers, temperature, alpha)
    return CAMKD.for_shapes(student, teachers, sample, temperature=temperature, alpha=alpha,
                            beta=beta, hint_layer=hint_layer, form=camkd_form)
