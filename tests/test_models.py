"""The seed's five teachers, its student, the ConvReg regressors and the official
CA-MKD ones (Embed/CalWeight)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlib.train.models import MODELS, TEACHERS, CalWeight, ConvReg, ConvRegs, Embed, build_model, count_parameters

SIZES = [(1, 28), (3, 32)]
# the seed kit's parameter counts on 1x28x28, 10 classes
SEED_PARAMS = {"teacher_cnn1": 276_000, "teacher_cnn2": 1_700_000, "teacher_resnet": 141_000,
               "teacher_vgg": 359_000, "teacher_densenet": 218_000, "student": 207_000}


@pytest.fixture(scope="module")
def built():
    """{(name, channels, size): (model in eval mode, logits, features)} on a batch of 2."""
    torch.manual_seed(0)
    out = {}
    with torch.no_grad():
        for name in MODELS:
            for ch, size in SIZES:
                model = build_model(name, ch, 10, size).eval()
                logits, feats = model(torch.randn(2, ch, size, size), return_features=True)
                out[name, ch, size] = (model, logits, feats)
    return out


def test_registry():
    assert set(SEED_PARAMS) == set(MODELS)
    assert TEACHERS == [n for n in MODELS if n != "student"]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("ch,size", SIZES)
def test_forward_shapes_and_features(built, name, ch, size):
    model, logits, feats = built[name, ch, size]
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert len(feats) == model.num_features == len(model.stages) + 1
    assert all(f.ndim == 4 and f.shape[0] == 2 for f in feats[:-1])
    assert feats[-2].ndim == 4 and feats[-1].ndim == 2 and feats[-1].shape[0] == 2
    # features[-1] is exactly what the classifier reads
    torch.testing.assert_close(model.classifier(feats[-1]), logits)
    # plain forward agrees with the feature forward
    with torch.no_grad():
        x = torch.randn(3, ch, size, size)
        torch.testing.assert_close(model(x), model(x, return_features=True)[0])


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("ch,size", SIZES)
def test_forward_from_reproduces_logits(built, name, ch, size):
    model, logits, feats = built[name, ch, size]
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model.forward_from(feats[-2]), logits, rtol=1e-5, atol=1e-5)
        for hint in range(-model.num_features, -1):       # every conv feature map
            torch.testing.assert_close(model.forward_from(feats[hint], hint), logits, rtol=1e-5, atol=1e-5)


def test_parameter_counts_match_seed(built):
    lines = []
    for name, expected in SEED_PARAMS.items():
        n = count_parameters(built[name, 1, 28][0])
        lines.append(f"{name:18s} {n:>9,d}  (seed {expected:>9,d}, {100 * (n - expected) / expected:+.1f}%)")
        assert abs(n - expected) <= 0.05 * expected, lines[-1]
    print("\nparameter counts on 1x28x28 (shown with pytest -s):\n" + "\n".join(lines))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_model("teacher_vit")
    for name in MODELS:
        assert name in str(err.value)
    assert "teacher_vit" in str(err.value)


@pytest.mark.parametrize("name", list(MODELS))
def test_bad_hint_layer_raises(built, name):
    model = built[name, 1, 28][0]
    bad = [-1, 0, 1, -model.num_features - 1]       # -1 is the neck vector, not a map
    for hint in bad:
        with pytest.raises(ValueError, match="hint_layer"):
            model.check_hint_layer(hint)
        with pytest.raises(ValueError, match="hint_layer"):
            model.forward_from(torch.zeros(1, 64, 7, 7), hint)
    assert model.check_hint_layer(-2) == model.num_features - 2


@pytest.mark.parametrize("ch,size", SIZES)
def test_convreg_maps_every_student_hint_to_every_teacher_hint(built, ch, size):
    s_feats = built["student", ch, size][2][:-1]
    pairs = 0
    for t_name in TEACHERS:
        for t_feat in built[t_name, ch, size][2][:-1]:
            for s_feat in s_feats:
                for relu in (True, False):
                    reg = ConvReg(s_feat.shape, t_feat.shape, use_relu=relu).train()
                    out = reg(s_feat)
                    assert out.shape == t_feat.shape, (t_name, tuple(s_feat.shape), tuple(t_feat.shape))
                    assert torch.isfinite(out).all()
                    if relu:
                        assert (out >= 0).all()
                    else:
                        assert (out < 0).any()
                pairs += 1
    assert pairs == len(s_feats) * sum(len(built[t, ch, size][2]) - 1 for t in TEACHERS)


@pytest.mark.parametrize("s_hw,t_hw,kind", [
    (14, 7, "stride2"), (16, 8, "stride2"), (7, 14, "transposed"), (7, 28, "upsample+1x1"),
    (7, 3, "valid5"), (7, 7, "valid1"), (16, 4, "valid13"), (9, 4, "valid6"),
    (3, 7, "same3+pool"), (5, 7, "same3+pool")])
def test_convreg_shape_cases(s_hw, t_hw, kind):
    """Every kernel case of ConvReg (RepDistiller's rules, as documented), including the
    odd ratios that need the adaptive-pool fallback."""
    reg = ConvReg((8, s_hw, s_hw), (12, t_hw, t_hw))
    conv = reg.conv
    got = ("transposed" if isinstance(conv, torch.nn.ConvTranspose2d)
           else "stride2" if conv.stride == (2, 2)
           else "same3+pool" if conv.padding == (1, 1)
           else ("upsample+1x1" if reg.upsample_to else f"valid{conv.kernel_size[0]}"))
    assert got == kind
    out = reg(torch.randn(2, 8, s_hw, s_hw))
    assert out.shape == (2, 12, t_hw, t_hw)
    out.sum().backward()
    assert reg.conv.weight.grad is not None and reg.conv.weight.grad.abs().sum() > 0


def _per_teacher_and_fused(s_shape, t_shapes, seed=0):
    """The reference (one ConvReg per teacher) and the fused form, from the same seed."""
    torch.manual_seed(seed)
    reference = torch.nn.ModuleList([ConvReg(s_shape, t) for t in t_shapes])
    torch.manual_seed(seed)
    return reference, ConvRegs(s_shape, t_shapes)


@pytest.mark.parametrize("teachers", [3, 5])
@pytest.mark.parametrize("hint", [-2, -3])
def test_fused_convregs_match_one_convreg_per_teacher(built, teachers, hint):
    """Same outputs, gradients (student feature and every weight) and BN running stats
    as the per-teacher ConvRegs, in fewer convolutions than teachers."""
    s_shape = tuple(built["student", 1, 28][2][hint].shape[1:])
    t_shapes = [tuple(built[t, 1, 28][2][hint].shape[1:]) for t in TEACHERS[:teachers]]
    reference, fused = _per_teacher_and_fused(s_shape, t_shapes)
    assert len(fused) == teachers and len(fused.groups) < teachers
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, *s_shape, generator=gen).contiguous(memory_format=torch.channels_last)
    probes = [torch.randn(16, *t, generator=gen) for t in t_shapes]
    grads, outs = [], []
    for regs in (reference, fused):
        xi = x.clone().requires_grad_()
        mapped = [r(xi) for r in regs] if regs is reference else regs.split(regs(xi))
        loss = sum((m * p).sum() for m, p in zip(mapped, probes))
        loss.backward()
        outs.append(mapped)
        grads.append(xi.grad)
    for m_ref, m_fused, t in zip(*outs, t_shapes):
        assert m_fused.shape == (16, *t)
        torch.testing.assert_close(m_fused, m_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    per_teacher = {f"{i}.{k}": p.grad for i, r in enumerate(reference) for k, p in r.named_parameters()}
    fused_grads = {k: p.grad for k, p in fused.named_parameters()}
    expected = fused._fused_state(per_teacher)
    # a conv bias before train-mode BatchNorm has a true gradient of 0 (BN subtracts the mean):
    # what autograd gives there is rounding noise of sums of terms ~100 (seen: 4e-5 against
    # 4e-5, in either order), so the absolute tolerance is set by the largest gradient's size
    scale = max(g.abs().max().item() for g in expected.values())
    for key, grad in fused_grads.items():
        torch.testing.assert_close(grad, expected[key], rtol=1e-4, atol=1e-6 * scale)
    ref_state = fused._fused_state({f"{i}.{k}": v for i, r in enumerate(reference) for k, v in r.state_dict().items()})
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-5, atol=1e-6)  # incl. BN running stats


@pytest.mark.parametrize("shapes", [[(64, 7, 7)] * 3, [(64, 7, 7), (64, 7, 7), (128, 3, 3), (152, 7, 7)]])
def test_fused_convregs_leave_the_random_stream_where_the_per_teacher_list_did(shapes):
    """After building, the seed's stream (what draws the student's dropout masks next)
    is where one ConvReg per teacher leaves it: fusing changes no later random draw."""
    torch.manual_seed(5)
    ConvRegs((64, 7, 7), shapes)
    after_fused = torch.rand(4)
    torch.manual_seed(5)
    torch.nn.ModuleList([ConvReg((64, 7, 7), t) for t in shapes])
    torch.testing.assert_close(after_fused, torch.rand(4), rtol=0, atol=0)


def test_fused_convregs_load_per_teacher_checkpoints():
    """A state_dict written with one ConvReg per teacher (regressors.<i>.conv.weight, ...)
    loads into the fused form and gives the same outputs."""
    shapes = [(64, 7, 7), (64, 7, 7), (128, 3, 3), (152, 7, 7)]
    reference, _ = _per_teacher_and_fused((64, 7, 7), shapes, seed=3)
    _, fused = _per_teacher_and_fused((64, 7, 7), shapes, seed=4)   # other weights until loaded
    for r in reference:
        r.bn.running_mean.uniform_()
    holder = torch.nn.Module()
    holder.regressors = fused
    holder.load_state_dict({f"regressors.{k}": v for k, v in reference.state_dict().items()})
    reference.eval(), fused.eval()
    x = torch.randn(4, 64, 7, 7)
    for m_ref, m_fused in zip([r(x) for r in reference], fused.split(fused(x))):
        torch.testing.assert_close(m_fused, m_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["student", "teacher_cnn1", "teacher_cnn2", "teacher_vgg"])
def test_pool_before_relu_is_the_seed_order_exactly(name):
    """Stages run MaxPool before ReLU (cheaper); the seed's ReLU-then-MaxPool order
    gives bit-identical logits and gradients."""
    torch.manual_seed(0)
    model = build_model(name).train()
    seed_order = build_model(name).train()
    seed_order.load_state_dict(model.state_dict())  # same keys: only parameter-free layers moved
    for stage in seed_order.stages:
        layers = list(stage)
        for i in range(1, len(layers)):
            if isinstance(layers[i - 1], torch.nn.MaxPool2d) and isinstance(layers[i], torch.nn.ReLU):
                layers[i - 1], layers[i] = layers[i], layers[i - 1]
        assert any(isinstance(a, torch.nn.ReLU) and isinstance(b, torch.nn.MaxPool2d) for a, b in zip(layers, layers[1:]))
        for i, layer in enumerate(layers):
            stage[i] = layer
    x = torch.randn(8, 1, 28, 28)
    outs = []
    for m in (model, seed_order):
        torch.manual_seed(1)  # same dropout masks
        out = m(x)
        out.square().sum().backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    for (key, p), q in zip(model.named_parameters(), seed_order.parameters()):
        assert torch.equal(p.grad, q.grad), key


@pytest.mark.parametrize("ch,size", SIZES)
@pytest.mark.parametrize("hint", [-2, -3])
def test_calweight_maps_the_student_to_every_teacher(built, ch, size, hint):
    """The official regressors: teacher i's map is Embed_i (1x1 conv, BN, ReLU) of the
    student map average-pooled to teacher i's size (here every teacher's size is at most
    the student's: teacher_vgg's is 3x3 at 28 px, 4x4 at 32 px), output shaped as the
    teacher's hint feature; recomputed with plain ops. Strict state_dict round trip."""
    s_feat = built["student", ch, size][2][hint]
    t_feats = [built[t, ch, size][2][hint] for t in TEACHERS]
    torch.manual_seed(0)
    regs = CalWeight(s_feat.shape[1:], [f.shape[1:] for f in t_feats]).train()
    assert len(regs) == len(TEACHERS) and all(isinstance(getattr(regs, f"embed{i}"), Embed) for i in range(5))
    out = regs(s_feat)
    if hint == -2 and size == 28:
        assert [tuple(f.shape[-2:]) for f in t_feats] == [(7, 7)] * 3 + [(3, 3), (7, 7)]
    for i, (o, t) in enumerate(zip(out, t_feats)):
        assert o.shape == t.shape, TEACHERS[i]
        conv, bn, _ = getattr(regs, f"embed{i}").transfer
        assert conv.kernel_size == (1, 1) and conv.bias is not None
        if i < 4:  # up to teacher_vgg, the input is the student map pooled once (sizes non-increasing)
            pooled = F.adaptive_avg_pool2d(s_feat, t.shape[-2:])
            z = F.conv2d(pooled, conv.weight, conv.bias)
            ref = torch.relu(F.batch_norm(z, None, None, bn.weight, bn.bias, training=True, eps=bn.eps))
            torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    assert all((o >= 0).all() for o in out)
    fresh = CalWeight(s_feat.shape[1:], [f.shape[1:] for f in t_feats])
    fresh.load_state_dict(regs.state_dict())          # strict
    regs.eval(), fresh.eval()
    for a, b in zip(regs(s_feat), fresh(s_feat)):
        assert torch.equal(a, b)
    assert set(regs.state_dict()) == {f"embed{i}.transfer.{k}" for i in range(5) for k in (
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")}
    with pytest.raises(RuntimeError, match="Missing key"):   # the kdbook regressors' weights do not fit
        fresh.load_state_dict(ConvRegs(s_feat.shape[1:], [f.shape[1:] for f in t_feats]).state_dict())


def test_calweight_resizes_in_a_chain_as_the_official_code():
    """``models/util.py`` reassigns ``feat_s`` when it resizes: each teacher's input is the
    previous teacher's resized map. teacher_vgg (3x3) before teacher_densenet (7x7), as in
    params/fashionmnist_5teachers.yaml: the 7x7 input is the 3x3 map, bilinearly upsampled."""
    torch.manual_seed(0)
    regs = CalWeight((64, 7, 7), [(128, 3, 3), (152, 7, 7), (64, 14, 14)]).eval()
    x = torch.randn(2, 64, 7, 7)
    seen = []
    for i in range(3):
        getattr(regs, f"embed{i}").register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    out = regs(x)
    assert [tuple(o.shape) for o in out] == [(2, 128, 3, 3), (2, 152, 7, 7), (2, 64, 14, 14)]
    p3 = F.adaptive_avg_pool2d(x, 3)
    up7 = F.interpolate(p3, size=(7, 7), mode="bilinear", align_corners=False)
    up14 = F.interpolate(up7, size=(14, 14), mode="bilinear", align_corners=False)
    for got, want in zip(seen, [p3, up7, up14]):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(seen[1], x, atol=1e-2)        # not the student map itself
    # an equal size is an identity (the three-teacher configs)
    same = CalWeight((64, 7, 7), [(32, 7, 7)])
    torch.testing.assert_close(CalWeight.resize(x, (7, 7)), x)
    assert same(x)[0].shape == (2, 32, 7, 7)
