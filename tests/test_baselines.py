"""The CA-MKD paper's multi-teacher baselines (aver, ebkd, aekd) and the label-smoothing
control, each recomputed in plain torch from the official code (Rorozhl/CA-MKD:
``helper/loops.py``, ``helper/optimization.py``, ``distiller_zoo/KD.py``) on a fixed
batch, values and gradients; gradient identities; the SVM weights against scikit-learn;
and the params that refuse a method its teachers cannot serve."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.svm import OneClassSVM

from kdlib.train.data import Dataset, Split
from kdlib.train.distillers import AEKD, EBKD, METHODS, Aver, LabelSmoothing, build_distiller
from kdlib.train.losses import (UNLABELLED, aekd_loss, aekd_nu, aver_kd_loss, ebkd_loss, entropy_weights,
                          kd_logit_gradients, labelled_ce, svm_teacher_weights, vanilla_kd_loss)
from kdlib.train.models import build_model
from kdlib.book.params import ParamsError, student_identity, validate
from kdlib.train.teachers import CachedTeachers, LiveTeachers, ViewCachedTeachers
from kdlib.train.loop import TrainConfig, train_epoch

B, C, M, D, T = 6, 5, 3, 4, 4.0


def batch(seed=0, m=M):
    """A tiny linear student (its logits are not a leaf, as a network's are not), teacher
    logits of different sharpness, labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen)
    weight = nn.Parameter(torch.randn(D, C, generator=gen))
    teachers = torch.randn(m, B, C, generator=gen) * torch.tensor([0.5, 2.0, 4.0, 1.0, 3.0])[:m, None, None]
    y = torch.randint(0, C, (B,), generator=gen)
    return x, weight, teachers, y


# ------------------------------------------------------------- the official formulas, transcribed
def official_kl(logit_s, logit_t, is_ca=False):
    """distiller_zoo/KD.py lines 13-20 (DistillKL.forward)."""
    p_s = F.log_softmax(logit_s / T, dim=1)
    p_t = F.softmax(logit_t / T, dim=1)
    if is_ca:
        return (nn.KLDivLoss(reduction="none")(p_s, p_t) * (T ** 2)).sum(-1)
    return nn.KLDivLoss(reduction="batchmean")(p_s, p_t) * (T ** 2)


def official_average(logit_s, logit_t_list):
    """helper/loops.py lines 200-203."""
    return torch.stack([official_kl(logit_s, t) for t in logit_t_list]).mean(0)


def official_ebkd(logit_s, logit_t_list):
    """helper/loops.py lines 204-219; returns (loss, weight)."""
    loss_div_list = [official_kl(logit_s, t, is_ca=True) for t in logit_t_list]
    entropy_list = []
    for logit_t in logit_t_list:
        softmax_logit_t = F.softmax(logit_t, dim=1)
        entropy_list.append((-softmax_logit_t * torch.log(softmax_logit_t)).sum(1))
    entropy_sum = torch.stack(entropy_list, dim=0).sum(dim=0)
    weight = torch.stack([1.0 - e / entropy_sum for e in entropy_list])
    loss_div = torch.stack(loss_div_list)
    return (weight * loss_div).sum() / (1.0 * loss_div.shape[1] * len(logit_t_list)), weight


def official_find_optimal_svm(vecs, nu=-1, is_norm=False):
    """helper/optimization.py lines 16-57 (method "ssvm-precomputed")."""
    m = vecs.shape[0]
    vec_mean = torch.mean(vecs.reshape(vecs.shape[0], vecs.shape[1], -1), dim=1)
    vec_norm = vec_mean.norm(dim=1, keepdim=True)
    if is_norm:
        vec_mean = vec_mean * (1 / vec_norm)
    G = torch.matmul(vec_mean, vec_mean.permute(1, 0))
    if nu == -1:
        nu = 1 / m
    elif nu > 1:
        nu = 1
    elif nu < 1 / m:
        nu = 1 / m
    ret = np.zeros(m)
    svm = OneClassSVM(kernel="precomputed", nu=nu, tol=1e-6)
    svm.fit(G.detach().numpy())
    ret[svm.support_] = svm.dual_coef_ / (m * nu)
    if is_norm:
        ret = ret * (1 / vec_norm.squeeze().detach().numpy())
        ret = ret / np.sum(ret)
    return torch.from_numpy(ret).float()


def official_aekd(x, weight, logit_t_list):
    """helper/loops.py lines 230-249, with the optimizer's zero_grad as the student's;
    nu as train_student.py line 142 sets it (C = 0.6, line 91). Returns (loss, scale)."""
    logit_s = x @ weight
    loss_div_list, grads = [], []
    logit_s.register_hook(lambda grad: grads.append(grad.data.clone()))
    for logit_t in logit_t_list:
        weight.grad = None
        loss_s = official_kl(logit_s, logit_t)
        loss_s.backward(retain_graph=True)
        loss_div_list.append(loss_s)
    scale = official_find_optimal_svm(torch.stack(grads), nu=1 / (0.6 * len(logit_t_list)))
    weight.grad = None
    return torch.dot(scale, torch.stack(loss_div_list)), scale


def grad_of(loss_fn, weight):
    weight.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach(), weight.grad.clone()


# ------------------------------------------------------------- aver
def test_aver_loss_and_gradient_are_the_official_average_loss():
    x, w, t, _ = batch()
    ours, g_ours = grad_of(lambda: aver_kd_loss(x @ w, t, T), w)
    ref, g_ref = grad_of(lambda: official_average(x @ w, list(t)), w)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def test_aver_has_vanillas_gradient_and_differs_from_it_by_the_teachers_js_divergence():
    """Mean of KLs = KL to the mean + T^2 JS(teachers): the gap does not depend on the
    student, so the gradients agree for any teachers, and the values agree for equal ones."""
    x, w, t, _ = batch()
    for teachers in (t, t[:1].expand(M, -1, -1)):
        a, ga = grad_of(lambda: aver_kd_loss(x @ w, teachers, T), w)
        v, gv = grad_of(lambda: vanilla_kd_loss(x @ w, teachers, T), w)
        torch.testing.assert_close(ga, gv, rtol=1e-5, atol=1e-7)
        p = F.softmax(teachers / T, -1)
        c = p.mean(0)
        js = (p * (p.log() - c.log())).sum(-1).mean(0).mean() * T * T  # (1/M) sum_i KL(p_i || c), batch mean
        torch.testing.assert_close(a - v, js, rtol=1e-4, atol=1e-6)
    assert js.abs() < 1e-6 and (a - v).abs() < 1e-5                    # identical teachers: the same loss
    assert aver_kd_loss(x @ w, t, T) - vanilla_kd_loss(x @ w, t, T) > 0.1  # different teachers: not


# ------------------------------------------------------------- ebkd
def test_ebkd_loss_weights_and_gradient_are_the_official_ebkd():
    x, w, t, _ = batch(1)
    w.grad = None
    ours, weights = ebkd_loss(x @ w, t, T)
    ours.backward()
    g_ours = w.grad.clone()
    w.grad = None
    ref, ref_weights = official_ebkd(x @ w, list(t))
    ref.backward()
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, ref_weights.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, w.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_ebkd_weights_sum_to_m_minus_1_and_favour_the_certain_teacher(m):
    _, _, t, _ = batch(2, m)
    w = entropy_weights(t)
    torch.testing.assert_close(w.sum(0), torch.full((B,), m - 1.0), rtol=0, atol=1e-5)
    sharp = t.clone()
    sharp[0] = t[0] * 50                       # teacher 0 near one-hot: lowest entropy everywhere
    assert (entropy_weights(sharp).argmax(0) == 0).all()
    same = entropy_weights(t[:1].expand(m, -1, -1))
    torch.testing.assert_close(same, torch.full((m, B), (m - 1) / m))
    certain = torch.zeros(m, B, C)
    certain[:, :, 0] = 1e4                     # every teacher exactly one-hot: 0/0 officially
    torch.testing.assert_close(entropy_weights(certain), torch.full((m, B), (m - 1) / m))
    assert not entropy_weights(t).requires_grad


# ------------------------------------------------------------- aekd
def test_closed_form_kd_logit_gradients_equal_autograd():
    x, w, t, _ = batch(3)
    s = (x @ w).detach().requires_grad_(True)
    for i in range(M):
        (g,) = torch.autograd.grad(F.kl_div(F.log_softmax(s / T, -1), F.softmax(t[i] / T, -1),
                                            reduction="batchmean") * T * T, s)
        torch.testing.assert_close(kd_logit_gradients(s, t, T)[i], g, rtol=1e-5, atol=1e-8)


def test_svm_teacher_weights_are_scikit_learns_on_the_same_gram_matrix():
    _, _, t, _ = batch(4)
    s = torch.randn(B, C, generator=torch.Generator().manual_seed(9))
    grads = kd_logit_gradients(s, t, T)
    lam = svm_teacher_weights(grads, aekd_nu(M))
    assert (lam >= 0).all() and lam.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert lam.max() <= 0.6 + 1e-6            # 1 / (nu M): the cap C = 0.6
    vec = grads.mean(1).double().numpy()       # each teacher's gradient averaged over the batch
    svm = OneClassSVM(kernel="precomputed", nu=1 / (0.6 * M), tol=1e-6).fit(vec @ vec.T)
    expected = np.zeros(M)
    expected[svm.support_] = svm.dual_coef_[0] / (M * svm.nu)
    np.testing.assert_allclose(lam.numpy(), expected, atol=1e-5)


def test_aekd_loss_scale_and_gradient_are_the_official_aekd():
    """Against the official branch run literally: a hook on the student logits and one
    backward pass per teacher, find_optimal_svm, the dot product."""
    for seed in (5, 6, 7):
        x, w, t, _ = batch(seed)
        ref, scale = official_aekd(x, w, list(t))
        ref, g_ref = grad_of(lambda: ref, w)
        w.grad = None
        ours, lam = aekd_loss(x @ w, t, T)
        ours.backward()
        torch.testing.assert_close(lam, scale, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.detach(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.grad, g_ref, rtol=1e-5, atol=1e-7)
        assert not lam.requires_grad


@pytest.mark.parametrize("m", [3, 5])
def test_aekd_weights_at_the_kd_gradients_scale_are_libsvms_starting_point(m):
    """A batch of 128, teachers near the student (a student some way into training) and
    the last one equal to it (its KD gradient is 0): the minimum-norm weighting puts the
    cap 0.6 on that one, and the solver finds it when the gradients are scaled up; at
    their own scale (Gram entries ~1e-7, under libsvm's tol=1e-6) it stops where it
    starts, a = (1, nu M - 1, 0, ...), i.e. 0.6 and 0.4 on the first two teachers
    whatever they say, as the official code does."""
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(128, 10, generator=gen) * 3
    t = s + torch.randn(m, 128, 10, generator=gen)
    t[-1] = s
    grads = kd_logit_gradients(s, t, T)
    start = torch.tensor([0.6, 0.4] + [0.0] * (m - 2))
    torch.testing.assert_close(svm_teacher_weights(grads, aekd_nu(m)), start)
    assert svm_teacher_weights(grads * 1e4, aekd_nu(m))[-1].item() == pytest.approx(0.6, abs=1e-5)


def test_aekd_nu_follows_train_student():
    assert aekd_nu(3) == pytest.approx(1 / 1.8) and aekd_nu(2) == pytest.approx(1 / 1.2)
    assert aekd_nu(1) == 1.0                   # 1/0.6 > 1: clamped as find_optimal_svm does


# ------------------------------------------------------------- label smoothing
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.35])
def test_label_smoothing_is_torchs_and_skips_unlabelled_targets(eps):
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(B, C, generator=gen, requires_grad=True)
    y = torch.randint(0, C, (B,), generator=gen)
    assert torch.equal(labelled_ce(logits, y, eps), F.cross_entropy(logits, y, label_smoothing=eps))
    partial = torch.where(torch.arange(B) % 2 == 0, y, UNLABELLED)
    keep = partial >= 0
    expected = F.cross_entropy(logits[keep], y[keep], label_smoothing=eps)
    got = labelled_ce(logits, partial, eps)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert torch.all(logits.grad[~keep] == 0)
    # by hand: (1 - eps) NLL + eps * mean over classes of -log p
    log_p = logits[keep].log_softmax(-1)
    by_hand = ((1 - eps) * -log_p.gather(1, y[keep, None]).squeeze(1) - eps * log_p.mean(-1)).mean()
    torch.testing.assert_close(got, by_hand)


def toy_data(n=64, classes=10) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return Dataset("FashionMNIST", Split(images, labels), Split(images[:20], labels[:20]), torch.tensor([0.5]),
                   torch.tensor([0.25]), [str(c) for c in range(classes)])


def trained_student(method: str, data: Dataset, **kw):
    torch.manual_seed(0)
    dist = build_distiller(method, build_model("student"), None, data.train.images[:1].float(), **kw)
    cfg = TrainConfig(epochs=1, batch_size=16, seed=0, channels_last=False)
    opt = torch.optim.Adam(dist.trainable_parameters(), lr=cfg.lr)
    for epoch in range(2):
        train_epoch(dist, opt, data, cfg, epoch, steps=4)
    return dist.student.state_dict()


def test_label_smoothing_zero_trains_exactly_as_scratch():
    data = toy_data()
    scratch = trained_student("scratch", data)
    zero = trained_student("label_smoothing", data, label_smoothing=0.0)
    smooth = trained_student("label_smoothing", data, label_smoothing=0.1)
    assert all(torch.equal(scratch[k], zero[k]) for k in scratch)
    assert not all(torch.equal(scratch[k], smooth[k]) for k in scratch)


def test_label_smoothing_trains_on_the_labelled_images_only():
    data = toy_data()
    data.labelled = torch.arange(len(data.train)) < 20
    seen = []
    dist = LabelSmoothing(build_model("student"), None, 0.1)
    forward = dist.forward_train
    dist.forward_train = lambda x, y, idx, epoch: (seen.append(idx.clone()), forward(x, y, idx, epoch))[1]
    cfg = TrainConfig(epochs=1, batch_size=16, seed=0, channels_last=False)
    train_epoch(dist, torch.optim.Adam(dist.student.parameters()), data, cfg, 0, steps=4)
    assert torch.cat(seen).max() < 20 and not LabelSmoothing.learns_from_teachers


# ------------------------------------------------------------- the distillers
@pytest.fixture(scope="module")
def bank_and_batch():
    torch.manual_seed(0)
    names = ["teacher_cnn1", "teacher_cnn2", "teacher_resnet"]
    live = LiveTeachers([build_model(n) for n in names], names)
    x = torch.randn(8, 1, 28, 28)
    cached = CachedTeachers(list(live.models), names)
    cached.build("train", 8, [(x, torch.arange(8))])
    views = ViewCachedTeachers(list(live.models), names, logits=live.logits(x))  # one view: row = sample
    return live, cached, x, torch.arange(8) % 10, views


@pytest.mark.parametrize("method,loss", [("aver", aver_kd_loss), ("ebkd", lambda s, t, T: ebkd_loss(s, t, T)[0]),
                                         ("aekd", lambda s, t, T: aekd_loss(s, t, T)[0])])
def test_distillers_terms_weights_and_the_teacher_cache(bank_and_batch, method, loss):
    live, cached, x, y, views = bank_and_batch
    idx = torch.arange(8)
    partial = torch.where(idx < 4, y, UNLABELLED)  # a transfer set: half the images unlabelled
    out = {}
    for bank in (live, cached, views):
        torch.manual_seed(1)
        dist = build_distiller(method, build_model("student"), bank, x[:1], temperature=2.0, alpha=0.5)
        dist.eval()
        logits, terms = dist.forward_train(x, partial, idx, 0)
        assert set(terms) == {"ce", "kd"}
        torch.testing.assert_close(terms["kd"], 0.5 * loss(logits, live.logits(x), 2.0))
        torch.testing.assert_close(terms["ce"], F.cross_entropy(logits[:4], y[:4]))
        out[type(bank).__name__] = terms["kd"]
        weights = dist.teacher_weights(x, partial, idx)
        if method == "aver":
            assert weights is None and dist.batch_stats == {}
            continue
        assert weights.shape == (3, 8)
        torch.testing.assert_close(dist.batch_stats["weight"], weights.mean(1))
        expected = entropy_weights(live.logits(x)) if method == "ebkd" else weights[:, :1].expand(-1, 8)
        torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(out["CachedTeachers"], out["LiveTeachers"])
    torch.testing.assert_close(out["ViewCachedTeachers"], out["LiveTeachers"])


def test_methods_and_their_classes():
    assert {"aver": Aver, "ebkd": EBKD, "aekd": AEKD, "label_smoothing": LabelSmoothing}.items() <= METHODS.items()
    assert [m for m, cls in METHODS.items() if not cls.learns_from_teachers] == ["scratch", "label_smoothing"]
    assert LabelSmoothing(build_model("student")).teacher_weights(None, None, None) is None


def test_one_teacher_refused_where_the_weighting_would_be_void():
    x = torch.randn(2, 1, 28, 28)
    one = LiveTeachers([build_model("teacher_cnn1")], ["teacher_cnn1"])
    for method in ("ebkd", "aekd"):
        with pytest.raises(ValueError, match=f"{method} needs at least 2 teachers, got 1"):
            build_distiller(method, build_model("student"), one, x[:1])
    aver = build_distiller("aver", build_model("student"), one, x[:1])  # single-teacher KD, as officially
    s = aver.student(x)
    torch.testing.assert_close(aver_kd_loss(s, one.logits(x), 4.0), vanilla_kd_loss(s, one.logits(x), 4.0))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        LabelSmoothing(build_model("student"), None, 1.0)


# ------------------------------------------------------------- params
@pytest.mark.parametrize("value,rule", [(1.5, "must be < 1"), (1, "must be < 1"), (-0.1, "must be >= 0")])
def test_bad_label_smoothing_refused_in_one_line(value, rule):
    with pytest.raises(ParamsError) as err:
        validate({"label_smoothing": value}, "p.yaml")
    text = str(err.value)
    assert text.startswith(f"p.yaml: label_smoothing: {float(value)!r} is not allowed; {rule}")
    assert "\n" not in text


@pytest.mark.parametrize("method", ["ebkd", "aekd", "camkd"])
def test_one_teacher_refused_for_weighting_methods(method):
    with pytest.raises(ParamsError) as err:
        validate({"methods": ["vanilla", method], "teachers": ["teacher_cnn1"]}, "p.yaml")
    text = str(err.value)
    assert text.startswith(f"p.yaml: teachers: ['teacher_cnn1'] is not allowed; {method} needs at least 2 teachers")
    assert text.endswith(f"name more teachers or drop {method} from methods") and "\n" not in text


def test_aver_and_label_smoothing_accepted_with_one_teacher():
    P = validate({"methods": ["aver", "label_smoothing"], "teachers": ["teacher_cnn1"], "label_smoothing": 0.2})
    assert P["label_smoothing"] == 0.2
    assert validate({})["label_smoothing"] == 0.1


def test_label_smoothing_enters_the_students_identity_only_when_not_the_default():
    """Students trained before the key existed keep their identity (and checkpoints)."""
    sha = {n: "sha" for n in validate({})["teachers"]}
    assert "label_smoothing" not in student_identity(validate({}), "camkd", 0, sha)
    smooth = student_identity(validate({"label_smoothing": 0.2}), "label_smoothing", 0, sha)
    assert smooth["label_smoothing"] == 0.2


# ------------------------------------------------------------- seven methods downstream
SEVEN = ["camkd", "vanilla", "aver", "ebkd", "aekd", "label_smoothing", "scratch"]


def test_a_sweep_of_seven_methods_shows_each_against_scratch_and_camkd(tmp_path):
    import json

    import yaml

    from kdlib.analysis import sweep_results as sweep_analysis
    from kdlib.analysis.stats import NAMES
    labels = np.arange(100) % 10
    runs = []
    for beta in (1.0, 5.0):
        name = f"beta={beta:g}"
        runs.append({"name": name, "overrides": {"beta": beta}})
        run = tmp_path / name
        run.mkdir()
        (run / "params.yaml").write_text(yaml.safe_dump(validate({"beta": beta, "seeds": [0, 1],
                                                                   "methods": list(reversed(SEVEN))})))
        (run / "manifest.json").write_text(json.dumps({"status": "finished"}))
        preds = {"labels": labels}
        for i, method in enumerate(SEVEN):
            accs = [80.0 + i + beta, 81.0 + i]
            (run / f"metrics_{method}.json").write_text(json.dumps({"method": method, "runs": [
                {"seed": s, "test_acc": a, "fidelity": {"centroid_fidelity": 0.1}} for s, a in enumerate(accs)]}))
            for s, a in enumerate(accs):
                preds[f"{method}/seed{s}"] = np.where(np.arange(100) < round(a), labels, (labels + 1) % 10)
        np.savez(run / "predictions.npz", **preds)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"runs": runs}))
    res = sweep_analysis.load(tmp_path)
    diffs = sweep_analysis.differences(res)
    assert len(diffs) == 2 * 21 and len(sweep_analysis.anchored(res, diffs)) == 2 * 11
    table = sweep_analysis.run_table(res)
    label = lambda m: NAMES[m]
    pairs = [f"{label(m)} − scratch" for m in SEVEN[1:-1]] + [f"CAMKD − {label(m)}" for m in SEVEN[1:]]
    assert list(table.columns) == ["setting", "seeds"] + [f"{label(m)} accuracy %" for m in SEVEN] + pairs
    lines = sweep_analysis.verdict_lines(res, diffs)
    assert len(lines) == 22 and lines[0].startswith("- beta=1: vanilla vs scratch:")
    wide = sweep_analysis.wide_table(sweep_analysis.setting_table(res), res.keys)
    assert [c for c in wide.columns if c.endswith("accuracy %")] == [f"{label(m)} accuracy %" for m in SEVEN]


def test_seven_methods_get_seven_fixed_distinct_colours():
    from matplotlib.colors import to_hex

    from kdlib.analysis import plots
    colors = plots.method_colors(SEVEN + ["other"])
    assert len({to_hex(c) for c in colors.values()}) == 8
    assert {m: colors[m] for m in SEVEN} == plots.method_colors(list(reversed(SEVEN)))


def test_the_14_panel_comparison_shows_seven_methods():
    from kdlib.analysis import plots
    from test_plots import make_metrics, make_teachers
    metrics = {}
    for i, method in enumerate(SEVEN):
        base = "scratch" if method in ("scratch", "label_smoothing") else "camkd" if method in (
            "camkd", "ebkd", "aekd") else "vanilla"
        metrics[method] = dict(make_metrics(base), method=method)
        for run in metrics[method]["runs"]:
            run["test_acc"] += i
    fig = plots.plot_comparison(metrics, make_teachers())
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == SEVEN
    assert len({h.get_color() for h in legend.legend_handles}) == 7
    summary = next(t.get_text() for a in fig.axes for t in a.texts if "centroid agr" in t.get_text())
    assert all(f"\n{m} " in summary for m in SEVEN)
    acc = {m: np.mean([r["test_acc"] for r in met["runs"]]) for m, met in metrics.items()}
    gaps = ", ".join(f"{m} {acc[m] - acc['camkd']:+.2f}" for m in SEVEN[1:])
    assert f"test acc minus camkd's (points, mean over seeds): {gaps}" in summary.replace("\n", " ")
    bars = next(a for a in fig.axes if a.get_title().startswith("Final test accuracy"))
    assert [t.get_text() for t in bars.get_xticklabels()][:7] == SEVEN


@pytest.mark.parametrize("method", ["aver", "ebkd", "aekd", "label_smoothing"])
def test_under_bf16_autocast(bank_and_batch, method):
    """precision: bf16 runs forward_train under CPU autocast: the losses stay finite and
    AEKD's Gram matrix is still computed in float32 (numpy has no bfloat16)."""
    live, _, x, y, _ = bank_and_batch
    torch.manual_seed(0)
    dist = build_distiller(method, build_model("student"), live, x[:1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms = dist.forward_train(x, y, torch.arange(8), 0)
        weights = dist.teacher_weights(x, y, torch.arange(8))
    total = sum(terms.values())
    assert torch.isfinite(total) and total.dtype == torch.float32
    total.backward()
    if method in ("ebkd", "aekd"):
        assert weights.shape == (3, 8) and torch.isfinite(weights).all()
