"""Distillation losses checked against independent computations (numpy/scipy, closed
forms, gradient identities), in the style of gnosis' ``test_kd_loss.py`` and
torchdistill's golden-value loss tests."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import log_softmax as np_log_softmax
from scipy.special import softmax as np_softmax
from scipy.stats import entropy

import kdlib.train.losses as losses
from kdlib.train.distillers import CAMKD, Scratch, Vanilla, build_distiller
from kdlib.train.losses import (DistillKL, camkd_feature_loss, camkd_logit_loss, camkd_weights, centroid_log_probs,
                          grouped_feature_mse, vanilla_kd_loss)
from kdlib.train.models import TEACHERS as TEACHER_NAMES, CalWeight, ConvReg, build_model
from kdlib.train.teachers import LiveTeachers

# A small fixed case: B = 3 samples, C = 4 classes, M = 3 teachers.
S = np.array([[1.0, -0.5, 2.0, 0.3],
              [0.2, 0.1, -1.0, 1.5],
              [-2.0, 0.5, 0.5, 0.0]])
T1 = np.array([[0.5, 0.0, 3.0, -1.0],
               [1.0, 2.0, -0.5, 0.0],
               [0.0, 0.0, 1.0, 2.0]])
TEACHERS = np.stack([T1, T1[:, ::-1] * 0.7, T1 * 1.8 - 0.4])   # [3,3,4]
Y = np.array([2, 1, 3])


def t(a, grad=False):
    return torch.tensor(np.ascontiguousarray(a), dtype=torch.float32, requires_grad=grad)


def np_kl_rows(p, q):
    """KL(p || q) per row with scipy (entropy(p, q) = sum p log(p/q))."""
    return entropy(p, q, axis=-1)


# --------------------------------------------------------------------------- DistillKL
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_distill_kl_matches_scipy(T):
    p, q = np_softmax(T1 / T, axis=-1), np_softmax(S / T, axis=-1)
    expected = T * T * np_kl_rows(p, q).mean()
    got = DistillKL(T)(t(S), t(T1))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_distill_kl_explicit_sum_and_weights():
    T = 3.0
    p, q = np_softmax(T1 / T, axis=-1), np_softmax(S / T, axis=-1)
    kl = (p * (np.log(p) - np.log(q))).sum(-1) * T * T     # explicit sum, no scipy
    w = np.array([0.2, 1.5, 0.0])
    got = DistillKL(T)(t(S), t(T1), weights=t(w))
    assert got.item() == pytest.approx((w * kl).sum() / len(kl), rel=1e-5)
    # unit weights give the plain batch mean; a weight of 0 removes a sample
    ones = DistillKL(T)(t(S), t(T1), weights=torch.ones(3))
    assert ones.item() == pytest.approx(kl.mean(), rel=1e-5)
    only0 = DistillKL(T)(t(S), t(T1), weights=torch.tensor([3.0, 0.0, 0.0]))
    assert only0.item() == pytest.approx(kl[0], rel=1e-5)


def test_distill_kl_matches_torch_kl_div_times_T2():
    T = 5.0
    s, tt = torch.randn(8, 10, generator=torch.Generator().manual_seed(0)), torch.randn(8, 10)
    ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(tt / T, -1), log_target=True,
                   reduction="batchmean") * T * T
    torch.testing.assert_close(DistillKL(T)(s, tt), ref, rtol=1e-5, atol=1e-6)


def test_distill_kl_T2_scaling_gradient_limit():
    """The T^2 factor keeps the gradient O(1) as T grows (Hinton et al. 2015): for large T,
    d/ds T^2 KL = T (q - p) -> ((s - mean s) - (t - mean t)) / (C B)."""
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, generator=gen, dtype=torch.float64).float().requires_grad_()
    tt = torch.randn(4, 6, generator=gen)
    B, C = s.shape
    limit = ((s - s.mean(1, keepdim=True)) - (tt - tt.mean(1, keepdim=True))).detach() / (C * B)
    g_big = torch.autograd.grad(DistillKL(200.0)(s, tt), s)[0]
    torch.testing.assert_close(g_big, limit, rtol=2e-2, atol=1e-4)
    # and the gradient is exactly T (q - p) / B at any T
    T = 4.0
    g = torch.autograd.grad(DistillKL(T)(s, tt), s)[0]
    closed = T * (F.softmax(s / T, -1) - F.softmax(tt / T, -1)).detach() / B
    torch.testing.assert_close(g, closed, rtol=1e-5, atol=1e-7)


def test_distill_kl_zero_iff_equal():
    x = t(S)
    assert DistillKL(4.0)(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # logits that differ only by a per-row constant give the same softmax: still 0
    assert DistillKL(4.0)(x, x + 3.0).item() == pytest.approx(0.0, abs=1e-5)
    assert DistillKL(4.0)(x, t(T1)).item() > 1e-3
    assert DistillKL(1.0)(t(T1), x).item() > 1e-3


# --------------------------------------------------------------------------- vanilla
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_vanilla_kd_is_kl_to_centroid(T):
    centroid = np_softmax(TEACHERS / T, axis=-1).mean(0)          # [B,C]
    q = np_softmax(S / T, axis=-1)
    expected = T * T * np_kl_rows(centroid, q).mean()
    assert vanilla_kd_loss(t(S), t(TEACHERS), T).item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(centroid_log_probs(t(TEACHERS), T).exp(),
                               torch.tensor(centroid, dtype=torch.float32), rtol=1e-5, atol=1e-7)


def test_vanilla_single_teacher_equals_distill_kl():
    assert vanilla_kd_loss(t(S), t(T1[None]), 4.0).item() == pytest.approx(
        DistillKL(4.0)(t(S), t(T1)).item(), rel=1e-6)


# --------------------------------------------------------------------------- CAMKD weights
def np_camkd_weights(teacher_logits, y):
    M = teacher_logits.shape[0]
    ce = -np_log_softmax(teacher_logits, axis=-1)[:, np.arange(len(y)), y]     # [M,B]
    return (1.0 - np_softmax(ce, axis=0)) / (M - 1)


def test_camkd_weights_shape_columns_and_numpy():
    w = camkd_weights(t(TEACHERS), torch.tensor(Y))
    assert w.shape == (3, 3)
    torch.testing.assert_close(w.sum(0), torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(w, torch.tensor(np_camkd_weights(TEACHERS, Y), dtype=torch.float32),
                               rtol=1e-5, atol=1e-7)


def test_camkd_weights_by_hand_one_sample():
    """M = 3, one sample, written out: CE_i = logsumexp(t_i) - t_i[y];
    w_i = (1 - exp(CE_i) / sum_j exp(CE_j)) / 2."""
    logits = [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]   # y = 0
    ce = [np.log(np.exp(2) + 2) - 2, np.log(3.0), np.log(2 + np.e) - 0.0]
    e = [np.exp(c) for c in ce]
    expected = [(1 - ei / sum(e)) / 2 for ei in e]
    w = camkd_weights(torch.tensor(logits)[:, None, :], torch.tensor([0]))
    assert w[:, 0].tolist() == pytest.approx(expected, rel=1e-5)
    # ordering: confident-correct > uniform > confident-wrong
    assert w[0, 0] > w[1, 0] > w[2, 0]


def test_camkd_weights_equal_teachers_give_one_over_M():
    for M in (2, 3, 5):
        logits = torch.randn(1, 7, 4).expand(M, 7, 4)
        w = camkd_weights(logits, torch.randint(0, 4, (7,)))
        torch.testing.assert_close(w, torch.full((M, 7), 1.0 / M), rtol=0, atol=1e-6)


def test_camkd_weights_more_confident_teacher_gets_more():
    y = torch.tensor([0, 1, 2, 3])
    confident = F.one_hot(y, 4).float() * 5.0
    unsure = torch.zeros(4, 4)
    w = camkd_weights(torch.stack([unsure, confident]), y)
    assert (w[1] > w[0]).all()
    # and swapping the teachers swaps the weights
    w2 = camkd_weights(torch.stack([confident, unsure]), y)
    torch.testing.assert_close(w2, w.flip(0))


def test_camkd_weights_need_two_teachers_and_are_detached():
    with pytest.raises(ValueError, match="at least 2 teachers"):
        camkd_weights(torch.randn(1, 3, 4), torch.tensor([0, 1, 2]))
    logits = torch.randn(2, 3, 4, requires_grad=True)
    assert not camkd_weights(logits, torch.tensor([0, 1, 2])).requires_grad


# --------------------------------------------------------------------------- CAMKD terms
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_camkd_logit_loss_matches_numpy(T):
    w = np_camkd_weights(TEACHERS, Y)                                          # [M,B]
    q = np_softmax(S / T, axis=-1)
    kl = np.stack([np_kl_rows(np_softmax(ti / T, axis=-1), q) for ti in TEACHERS])  # [M,B]
    expected = (w * kl * T * T).sum(0).mean()
    loss, wt = camkd_logit_loss(t(S), t(TEACHERS), torch.tensor(Y), T)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(wt, torch.tensor(w, dtype=torch.float32), rtol=1e-5, atol=1e-7)


def test_camkd_logit_loss_is_weighted_sum_of_distill_kl():
    """Same quantity built from DistillKL with per-sample weights, teacher by teacher."""
    s, tl, y = t(S), t(TEACHERS), torch.tensor(Y)
    w = camkd_weights(tl, y)
    by_hand = sum(DistillKL(4.0)(s, tl[i], weights=w[i]) for i in range(3))
    loss, _ = camkd_logit_loss(s, tl, y, 4.0)
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-7)


def test_equal_weights_camkd_gradient_equals_vanilla(monkeypatch):
    """With w = 1/M, CAMKD's logit term differs from vanilla KD only by a constant
    (T^2 (H(c) - mean_i H(p_i)), the Jensen gap), so the gradients w.r.t. the student
    logits are identical."""
    T = 4.0
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(6, 5, generator=gen).requires_grad_()
    tl = torch.randn(3, 6, 5, generator=gen) * 2
    y = torch.randint(0, 5, (6,), generator=gen)
    monkeypatch.setattr(losses, "camkd_weights", lambda logits, targets: torch.full(logits.shape[:2], 1 / 3))
    cam, w = camkd_logit_loss(s, tl, y, T)
    assert torch.allclose(w, torch.full((3, 6), 1 / 3))
    van = vanilla_kd_loss(s, tl, T)
    g_cam = torch.autograd.grad(cam, s)[0]
    g_van = torch.autograd.grad(van, s)[0]
    torch.testing.assert_close(g_cam, g_van, rtol=0, atol=1e-6)
    # the same with the weighted DistillKL sum built by hand (no monkeypatch involved)
    by_hand = sum(DistillKL(T)(s, tl[i], weights=torch.full((6,), 1 / 3)) for i in range(3))
    torch.testing.assert_close(torch.autograd.grad(by_hand, s)[0], g_van, rtol=0, atol=1e-6)
    # the values differ by exactly the Jensen gap
    p = F.softmax(tl / T, -1).double()
    c = p.mean(0)
    ent = lambda a: -(a * a.log()).sum(-1)
    gap = T * T * (ent(c) - ent(p).mean(0)).mean()
    assert (cam - van).item() == pytest.approx(gap.item(), rel=1e-4, abs=1e-6)
    assert gap.item() > 0


def test_soft_cross_entropy_and_kl_have_same_gradient():
    T = 4.0
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(5, 7, generator=gen).requires_grad_()
    tt = torch.randn(5, 7, generator=gen)
    soft_ce = -(F.softmax(tt / T, -1) * F.log_softmax(s / T, -1)).sum(-1).mean() * T * T
    kl = DistillKL(T)(s, tt)
    torch.testing.assert_close(torch.autograd.grad(soft_ce, s)[0], torch.autograd.grad(kl, s)[0],
                               rtol=0, atol=1e-6)
    # CE - KL = T^2 * H(p), independent of s
    p = F.softmax(tt / T, -1)
    assert (soft_ce - kl).item() == pytest.approx((-(p * p.log()).sum(-1).mean() * T * T).item(), rel=1e-4)


def test_camkd_feature_loss_matches_numpy():
    """Teachers 0 and 1 share a feature size (one fused regressor output holds both),
    teacher 2 has its own; targets in fp16, as the cache serves them."""
    rng = np.random.default_rng(5)
    B = 4
    mapped = [rng.normal(size=(B, 3, 2, 2)), rng.normal(size=(B, 5, 2, 2)), rng.normal(size=(B, 4, 3, 3))]
    targets = [rng.normal(size=m.shape) for m in mapped]
    head = rng.normal(size=(3, B, 6)) * 2
    y = np.array([0, 5, 2, 2])
    v = np_camkd_weights(head, y)
    mse = np.stack([((m - tg) ** 2).reshape(B, -1).mean(1) for m, tg in zip(mapped, targets)])
    expected = (v * mse).sum(0).mean()
    half = [t(x).half() for x in targets]
    got = torch.cat([grouped_feature_mse(torch.cat([t(mapped[0]), t(mapped[1])], 1), half[:2]),
                     grouped_feature_mse(t(mapped[2]), half[2:])])
    loss, vt = camkd_feature_loss(got, t(head), torch.tensor(y))
    # targets were rounded to fp16 (as the cache stores them): compare to that rounding
    targets16 = [x.astype(np.float16).astype(np.float64) for x in targets]
    mse16 = np.stack([((m - tg) ** 2).reshape(B, -1).mean(1) for m, tg in zip(mapped, targets16)])
    np.testing.assert_allclose(got.numpy(), mse16, rtol=1e-5)
    assert loss.item() == pytest.approx((v * mse16).sum(0).mean(), rel=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-2)
    torch.testing.assert_close(vt, torch.tensor(v, dtype=torch.float32), rtol=1e-5, atol=1e-7)
    same = grouped_feature_mse(torch.cat([t(targets[0]), t(targets[1])], 1), [t(targets[0]), t(targets[1])])
    zero, _ = camkd_feature_loss(torch.cat([same, torch.zeros(1, B)]), t(head), torch.tensor(y))
    assert zero.item() == 0.0


# --------------------------------------------------------------------------- distillers
@pytest.fixture(scope="module")
def camkd_setup():
    torch.manual_seed(0)
    teachers = LiveTeachers([build_model("teacher_cnn1"), build_model("teacher_resnet")],
                            ["teacher_cnn1", "teacher_resnet"])
    student = build_model("student")
    x = torch.randn(8, 1, 28, 28)
    y = torch.arange(8) % 10
    dist = build_distiller("camkd", student, teachers, x[:1], temperature=4.0, alpha=0.7, beta=100.0)
    return dist, teachers, x, y


def test_camkd_distiller_terms_and_epochs(camkd_setup):
    dist, teachers, x, y = camkd_setup
    assert isinstance(dist, CAMKD) and len(dist.regressors) == 2
    dist.train()
    _, l0 = dist.forward_train(x, y, torch.arange(8), epoch=0)
    assert set(l0) == {"ce", "kd", "feat"}
    assert l0["feat"].item() == 0.0
    logits, l1 = dist.forward_train(x, y, torch.arange(8), epoch=1)
    assert set(l1) == {"ce", "kd", "feat"}
    assert l1["feat"].item() > 0
    assert logits.shape == (8, 10)
    # the kd term is alpha times camkd_logit_loss on the teachers' logits
    t_logits, _ = teachers.outputs(x)
    dist.eval()
    s = dist.student(x)
    _, le = dist.forward_train(x, y, torch.arange(8), epoch=0)
    ref, _ = camkd_logit_loss(s, t_logits, y, 4.0)
    torch.testing.assert_close(le["kd"], 0.7 * ref)
    torch.testing.assert_close(le["ce"], F.cross_entropy(s, y))


def test_camkd_distiller_gradients_and_frozen_teachers(camkd_setup):
    dist, teachers, x, y = camkd_setup
    dist.train()
    assert dist.training and dist.student.training and all(r.training for r in dist.regressors.modules())
    assert not teachers.training
    assert all(not m.training for m in teachers.modules())       # BN and Dropout too
    teachers.train(True)                                         # the bank itself refuses too
    assert all(not m.training for m in teachers.modules())
    dist.zero_grad(set_to_none=True)
    _, l = dist.forward_train(x, y, torch.arange(8), epoch=1)
    sum(l.values()).backward()
    for r in dist.regressors.groups:
        grads = [p.grad for p in r.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in teachers.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dist.student.parameters())
    # trainable parameters = student + regressors, never teachers
    ids = {id(p) for p in dist.trainable_parameters()}
    assert ids == {id(p) for p in dist.student.parameters()} | {id(p) for p in dist.regressors.parameters()}
    assert not ids & {id(p) for p in teachers.parameters()}


@pytest.mark.parametrize("teachers,hint", [(3, -2), (5, -2), (5, -3)])
def test_camkd_feature_term_and_gradients_match_one_convreg_per_teacher(teachers, hint):
    """The fused regressors give the feature term and gradients of the pre-fusion
    computation: one ConvReg per teacher, MSE of each flattened map, same weights."""
    torch.manual_seed(0)
    names = TEACHER_NAMES[:teachers]
    bank = LiveTeachers([build_model(n) for n in names], names, hint)
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    dist = build_distiller("camkd", build_model("student"), bank, x[:1], beta=100.0, hint_layer=hint).train()
    s_shape = tuple(dist.student(x[:1], return_features=True)[1][hint].shape[1:])
    _, t_hints = bank.outputs(x)
    reference = torch.nn.ModuleList([ConvReg(s_shape, tuple(h.shape[1:])) for h in t_hints]).train()
    dist.load_state_dict({f"regressors.{k}": v for k, v in reference.state_dict().items()}, strict=False)

    torch.manual_seed(5)  # the same dropout masks in both forward passes
    _, terms = dist.forward_train(x, y, torch.arange(16), epoch=1)
    dist.zero_grad(set_to_none=True)
    terms["feat"].backward()
    fused_grads = [p.grad for p in dist.student.parameters()]  # None after the hint layer
    fused_reg_grads = {k: p.grad for k, p in dist.regressors.named_parameters()}

    torch.manual_seed(5)
    dist.zero_grad(set_to_none=True)
    feats = dist.student(x, return_features=True)[1]
    mapped = [r(feats[hint]) for r in reference]
    with torch.no_grad():
        v = camkd_weights(torch.stack([bank.head(i, m) for i, m in enumerate(mapped)]), y)
    mse = torch.stack([(m - t).pow(2).flatten(1).mean(1) for m, t in zip(mapped, t_hints)])
    expected = 100.0 * (v * mse).sum(0).mean()
    expected.backward()
    torch.testing.assert_close(terms["feat"], expected, rtol=1e-5, atol=1e-6)
    ref_grads = [p.grad for p in dist.student.parameters()]
    assert [g is None for g in fused_grads] == [g is None for g in ref_grads] != [True] * len(ref_grads)
    for got, want in zip(fused_grads, ref_grads):
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    want = dist.regressors._fused_state({f"{i}.{k}": p.grad for i, r in enumerate(reference)
                                         for k, p in r.named_parameters()})
    for key, grad in fused_reg_grads.items():
        torch.testing.assert_close(grad, want[key], rtol=1e-4, atol=1e-6)


def test_vanilla_and_scratch_distillers():
    torch.manual_seed(1)
    teachers = LiveTeachers([build_model("teacher_cnn1"), build_model("teacher_cnn2")], ["a", "b"])
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    van = build_distiller("vanilla", build_model("student"), teachers, x[:1], temperature=2.0, alpha=0.5)
    assert isinstance(van, Vanilla)
    van.eval()
    _, l = van.forward_train(x, y, torch.arange(4), 0)
    assert set(l) == {"ce", "kd"}
    torch.testing.assert_close(l["kd"], 0.5 * vanilla_kd_loss(van.student(x), teachers.outputs(x)[0], 2.0))
    sc = build_distiller("scratch", build_model("student"), None, x[:1])
    assert isinstance(sc, Scratch)
    _, l = sc.forward_train(x, y, torch.arange(4), 0)
    assert set(l) == {"ce"}
    with pytest.raises(ValueError, match="scratch, vanilla, camkd"):
        build_distiller("fitnet", build_model("student"), teachers, x[:1])
    one = LiveTeachers([build_model("teacher_cnn1")], ["a"])
    with pytest.raises(ValueError, match="at least 2 teachers"):
        build_distiller("camkd", build_model("student"), one, x[:1])


FIVE = ["teacher_cnn1", "teacher_cnn2", "teacher_resnet", "teacher_vgg", "teacher_densenet"]


@pytest.mark.parametrize("names,hint", [(FIVE[:3], -2), (FIVE, -2), (FIVE[:3], -3), (FIVE, -3)],
                         ids=["M3-hint-2", "M5-hint-2", "M3-hint-3", "M5-hint-3"])
def test_camkd_feature_term_recomputed_independently(names, hint):
    """beta * (1/B) sum_b sum_i v[i,b] MSE(r_i(f_s), f_t_i)[b], recomputed in numpy from
    regressor i, teacher i's own hint feature and teacher i's own head (v from the head's
    CE on the mapped feature): a wrong beta, or regressor i paired with teacher j's hint
    or head, gives another number."""
    torch.manual_seed(len(names) - hint)
    teachers = LiveTeachers([build_model(n) for n in names], names, hint_layer=hint)
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 3, 5, 7, 9, 2])
    dist = build_distiller("camkd", build_model("student"), teachers, x[:1], beta=37.0, hint_layer=hint)
    dist.eval()                                   # no dropout: the same student features below
    _, got = dist.forward_train(x, y, torch.arange(6), epoch=1)
    with torch.no_grad():
        f_s = dist.student(x, return_features=True)[1][hint]
        mse, ce = [], []
        per_teacher = dist.regressors.split(dist.regressors(f_s))     # r_i(f_s), in teacher order
        for mapped, teacher in zip(per_teacher, teachers.models, strict=True):
            f_t = teacher(x, return_features=True)[1][hint]
            assert mapped.shape == f_t.shape
            diff = (mapped - f_t).double().numpy()
            mse.append((diff ** 2).reshape(6, -1).mean(1))
            head = teacher.forward_from(mapped, hint).double().numpy()
            ce.append(-np_log_softmax(head, axis=-1)[np.arange(6), y.numpy()])
    v = (1 - np_softmax(np.array(ce), axis=0)) / (len(names) - 1)
    expected = 37.0 * (v * np.array(mse)).sum(0).mean()
    assert got["feat"].item() == pytest.approx(expected, rel=1e-4)
    assert dist.batch_stats["feat_weight"].numpy() == pytest.approx(v.mean(1), rel=1e-4)


def test_grouped_feature_mse_under_bf16_autocast_with_fp16_targets():
    """The GPU path's types on the CPU: bf16 mapped features (autocast), fp16 cached targets."""
    gen = torch.Generator().manual_seed(2)
    mapped = torch.randn(4, 7, 2, 2, generator=gen)
    targets = [torch.randn(4, 3, 2, 2, generator=gen).half(), torch.randn(4, 4, 2, 2, generator=gen).half()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grouped_feature_mse(mapped.bfloat16(), targets)
    want = grouped_feature_mse(mapped.bfloat16().float(), [t.float() for t in targets])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- camkd_form: official
def test_official_terms_are_kdbook_over_M_and_differentiate_through_the_feature_weights():
    """On one fixed batch, with the same features and heads: each official term is the
    kdbook term / M in value. The logit weights are constant in both forms (gradient
    / M); the feature weights are detached in kdbook and not in official, whose
    gradient is (kdbook's + the part through v) / M, checked against autograd on a
    computation written out here."""
    gen = torch.Generator().manual_seed(7)
    M, B, C, D, T = 3, 5, 4, 6, 4.0
    s = torch.randn(B, C, generator=gen).requires_grad_()
    tl = torch.randn(M, B, C, generator=gen) * 2
    y = torch.tensor([0, 3, 1, 1, 2])
    kb, w_kb = camkd_logit_loss(s, tl, y, T)
    of, w_of = camkd_logit_loss(s, tl, y, T, official=True)
    torch.testing.assert_close(of, kb / M)
    torch.testing.assert_close(w_of, w_kb)
    assert not w_of.requires_grad
    torch.testing.assert_close(torch.autograd.grad(of, s)[0], torch.autograd.grad(kb, s)[0] / M)

    # feature term: mapped features r_i [B,D] (with their graph), linear heads, targets
    r = torch.randn(M, B, D, generator=gen).requires_grad_()
    heads, f_t = torch.randn(M, D, C, generator=gen), torch.randn(M, B, D, generator=gen)
    head_logits = lambda: torch.einsum("mbd,mdc->mbc", r, heads)
    mse = lambda: (r - f_t).pow(2).mean(-1)
    fk, vk = camkd_feature_loss(mse(), head_logits(), y)
    fo, vo = camkd_feature_loss(mse(), head_logits(), y, official=True)
    torch.testing.assert_close(fo, fk / M)
    torch.testing.assert_close(vo.detach(), vk)
    assert vo.requires_grad and not vk.requires_grad
    g_kb, g_of = torch.autograd.grad(fk, r)[0], torch.autograd.grad(fo, r)[0]
    # the same by hand
    z = torch.einsum("mbd,mdc->mbc", r, heads)
    ce = -F.log_softmax(z, -1)[:, torch.arange(B), y]                      # [M,B]
    v = (1 - torch.softmax(ce, 0)) / (M - 1)
    sq = ((r - f_t) ** 2).sum(-1) / D
    torch.testing.assert_close(g_of, torch.autograd.grad((v * sq).sum() / (B * M), r, retain_graph=True)[0])
    torch.testing.assert_close(g_kb, torch.autograd.grad((v.detach() * sq).sum() / B, r, retain_graph=True)[0])
    through_v = torch.autograd.grad((v * sq.detach()).sum() / B, r)[0]
    torch.testing.assert_close(g_of * M - g_kb, through_v, rtol=1e-4, atol=1e-6)
    assert through_v.abs().max() > 1e-3          # the detach matters on this batch


def _bn_relu_by_hand(z, bn):
    """Train-mode BatchNorm2d (batch statistics, biased variance) then ReLU, in plain ops."""
    mean, var = z.mean((0, 2, 3), keepdim=True), z.var((0, 2, 3), unbiased=False, keepdim=True)
    return torch.relu((z - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1)
                      + bn.bias.view(1, -1, 1, 1))


@pytest.mark.parametrize("names", [FIVE[:3], ["teacher_cnn1", "teacher_resnet", "teacher_vgg"],
                                   ["teacher_vgg", "teacher_densenet"]],
                         ids=["M3-all-7x7", "vgg-3x3-last", "vgg-3x3-first"])
def test_official_camkd_loss_and_gradients_recomputed_from_plain_torch(names):
    """The whole official loss, CE + alpha L_logit + beta L_feat, written out in torch ops
    after ``helper/loops.py`` (CAMKD branch), ``CalWeight`` and ``CAMKD.forward``: values
    to 1e-5 and the gradient of every student and regressor weight."""
    torch.manual_seed(len(names))
    bank = LiveTeachers([build_model(n) for n in names], names)
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 3, 5, 7, 9, 2])
    dist = build_distiller("camkd", build_model("student"), bank, x[:1], temperature=3.0, alpha=0.6, beta=20.0,
                           camkd_form="official").train()
    assert isinstance(dist.regressors, CalWeight) and dist.extra_module() is dist.regressors
    torch.manual_seed(5)                                  # the same dropout masks below
    _, terms = dist.forward_train(x, y, torch.arange(6), epoch=1)
    dist.zero_grad(set_to_none=True)
    sum(terms.values()).backward()
    got = {k: p.grad.clone() for k, p in dist.named_parameters() if p.grad is not None}
    stats = dict(dist.batch_stats)

    torch.manual_seed(5)
    dist.zero_grad(set_to_none=True)
    M, B, T = len(names), 6, 3.0
    s_logits, feats = dist.student(x, return_features=True)
    with torch.no_grad():
        t_out = [m(x, return_features=True) for m in bank.models]
    ce_rows = lambda z: -F.log_softmax(z, -1)[torch.arange(B), y]
    w = (1 - torch.softmax(torch.stack([ce_rows(t) for t, _ in t_out]), 0)) / (M - 1)
    log_q = F.log_softmax(s_logits / T, -1)
    kl = torch.stack([(F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - log_q)).sum(-1) * T * T for t, _ in t_out])
    kd = (w * kl).sum() / (B * M)
    inp, mse, ce = feats[-2], [], []
    for i, (teacher, (_, t_feats)) in enumerate(zip(bank.models, t_out)):
        target = t_feats[-2]
        h = target.shape[-1]
        inp = (F.adaptive_avg_pool2d(inp, (h, h)) if inp.shape[-1] >= h      # chained, as the official code
               else F.interpolate(inp, size=(h, h), mode="bilinear", align_corners=False))
        conv, bn, _ = getattr(dist.regressors, f"embed{i}").transfer
        r = _bn_relu_by_hand(F.conv2d(inp, conv.weight, conv.bias), bn)
        assert r.shape == target.shape
        mse.append((r - target).pow(2).flatten(1).mean(1))
        ce.append(ce_rows(teacher.forward_from(r, -2)))
    v = (1 - torch.softmax(torch.stack(ce), 0)) / (M - 1)
    feat = (v * torch.stack(mse)).sum() / (B * M)
    ce_s = F.cross_entropy(s_logits, y)
    torch.testing.assert_close(terms["ce"], ce_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kd"], 0.6 * kd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["feat"], 20.0 * feat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["weight"], w.mean(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["feat_weight"], v.detach().mean(1), rtol=1e-5, atol=1e-7)
    assert not stats["feat_weight"].requires_grad
    # the same loss with v detached (kdbook's choice): its gradient must differ
    regs = dict(dist.regressors.named_parameters())
    feat_detached = (v.detach() * torch.stack(mse)).sum() / (B * M)
    detached = torch.autograd.grad(20.0 * feat_detached, list(regs.values()), retain_graph=True)
    (ce_s + 0.6 * kd + 20.0 * feat).backward()
    want = {k: p.grad for k, p in dist.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    assert {k.split(".")[1] for k in got if k.startswith("regressors.")} == {f"embed{i}" for i in range(M)}
    for k in got:
        if k.endswith("transfer.0.bias"):     # a conv bias before train-mode BN: zero gradient, up to rounding
            assert got[k].abs().max() < 1e-5 and want[k].abs().max() < 1e-5, k
            continue
        # to 1e-4 relative, or 1e-3 of the tensor's largest entry (float32 cancellation in BN's backward)
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-3 * want[k].abs().max().item(),
                                   msg=lambda m: f"{k}: {m}")
    gaps = [((g - want["regressors." + k]).abs().max() / want["regressors." + k].abs().max()).item()
            for k, g in zip(regs, detached) if k.endswith("transfer.0.weight")]
    assert min(gaps) > 1e-2, gaps             # v's own gradient is part of what every regressor gets
    assert all(p.grad is None and not p.requires_grad for p in bank.parameters())


def test_official_first_epoch_and_kd_term_against_kdbook():
    """Epoch 0: no feature term in either form (the official ``if epoch == 1``, epochs from
    1); the official kd term is kdbook's / M on the same student."""
    torch.manual_seed(3)
    names = FIVE[:3]
    bank = LiveTeachers([build_model(n) for n in names], names)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    out = {}
    for form in ("kdbook", "official"):
        torch.manual_seed(0)
        dist = build_distiller("camkd", build_model("student"), bank, x[:1], camkd_form=form).eval()
        assert dist.form == form
        _, out[form] = dist.forward_train(x, y, torch.arange(8), epoch=0)
        assert out[form]["feat"].item() == 0.0 and set(dist.batch_stats) == {"weight"}
    torch.testing.assert_close(out["official"]["kd"], out["kdbook"]["kd"] / 3)
    torch.testing.assert_close(out["official"]["ce"], out["kdbook"]["ce"])
    with pytest.raises(ValueError, match="unknown camkd_form 'other': valid forms are kdbook, official"):
        build_distiller("camkd", build_model("student"), bank, x[:1], camkd_form="other")
