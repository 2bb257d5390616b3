"""The seed kit's five teachers and its student, plus the regressors for feature matching
(``ConvReg``/``ConvRegs``; the official CA-MKD ``Embed``/``CalWeight``).

Every model is a `StagedNet`: a list of convolutional `stages`, a `neck` that turns
the last feature map into a vector, and a linear `classifier`. That one shape gives
every model the same feature interface:

* ``model(x)`` -> logits
* ``model(x, return_features=True)`` -> ``(logits, features)`` where ``features`` is
  the list of stage outputs followed by the neck vector, so ``features[-2]`` is the
  last conv feature map (the seed's ``hint_layer: -2``) and ``features[-1]`` the
  vector the classifier reads.
* ``model.hint_forward(x, hint_layer)`` -> ``(logits, features[hint_layer])``, what the
  distillers read;
* ``model.forward_from(feature, hint_layer)`` finishes the forward pass from a
  feature (CAMKD applies each teacher's head to the mapped student feature).

Own models (any ``nn.Module``) get the same interface from ``kdlib.train.own.HookedNet``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class StagedNet(nn.Module):
    """Base class: ``stages`` -> ``neck`` -> ``classifier``."""

    def __init__(self, stages: list[nn.Module], neck: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.neck = neck
        self.classifier = classifier

    @property
    def num_features(self) -> int:
        """Length of the ``features`` list: one per stage, plus the neck vector."""
        return len(self.stages) + 1

    def check_hint_layer(self, hint_layer: int) -> int:
        """Return the stage index a (negative) ``hint_layer`` names, or raise."""
        valid = range(-self.num_features, -1)
        if hint_layer not in valid:
            raise ValueError(
                f"hint_layer {hint_layer} is not a conv feature map of {type(self).__name__}: "
                f"use one of {list(valid)} (-2 is the last conv stage)")
        return self.num_features + hint_layer

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        vector = self.neck(x)
        logits = self.classifier(vector)
        if return_features:
            return logits, features + [vector]
        return logits

    has_hint = True  # every conv stage is one (own models: kdlib.train.own.HookedNet)

    def hint_forward(self, x: torch.Tensor, hint_layer: int = -2):
        """``(logits, features[hint_layer])``: what the distillers read of a model."""
        logits, features = self(x, return_features=True)
        return logits, features[hint_layer]

    def forward_from(self, feature: torch.Tensor, hint_layer: int = -2) -> torch.Tensor:
        """Logits computed from ``features[hint_layer]`` by the layers after it."""
        start = self.check_hint_layer(hint_layer) + 1
        for stage in self.stages[start:]:
            feature = stage(feature)
        return self.classifier(self.neck(feature))


def _conv(cin: int, cout: int, k: int = 3, bn: bool = False, pool: bool = False) -> list[nn.Module]:
    """Conv [-> BN] -> ReLU, or with ``pool`` Conv [-> BN] -> MaxPool(2) -> ReLU: the same
    function as ReLU then MaxPool (ReLU is monotone, so the two commute, gradients
    included), with the ReLU's forward and backward passes on a quarter of the pixels."""
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return layers + ([nn.MaxPool2d(2)] if pool else []) + [nn.ReLU(inplace=True)]


def _mlp_neck(flat: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, hidden),
                         nn.ReLU(inplace=True), nn.Dropout(dropout))


class TeacherCNN1(StagedNet):
    """Deep CNN: 4 conv layers (two per stage), MaxPool, Dropout 0.5 (seed: 276K params)."""

    def __init__(self, in_channels=1, num_classes=10, image_size=28):
        side = image_size // 4
        stages = [nn.Sequential(*_conv(in_channels, 32), *_conv(32, 32, pool=True)),
                  nn.Sequential(*_conv(32, 64), *_conv(64, 64, pool=True))]
        super().__init__(stages, _mlp_neck(64 * side * side, 68, 0.5), nn.Linear(68, num_classes))


class TeacherCNN2(StagedNet):
    """Wide CNN with 5x5 filters and a large fully connected layer (seed: 1.7M params)."""

    def __init__(self, in_channels=1, num_classes=10, image_size=28):
        side = image_size // 4
        stages = [nn.Sequential(*_conv(in_channels, 32, 5, pool=True)),
                  nn.Sequential(*_conv(32, 64, 5, pool=True))]
        super().__init__(stages, _mlp_neck(64 * side * side, 520, 0.5), nn.Linear(520, num_classes))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TeacherResNet(StagedNet):
    """ResNet-like: 16-channel stem, residual blocks of 32 and 2x64 channels (stride 2
    at each widening), BatchNorm, global average pooling (seed: 141K params)."""

    def __init__(self, in_channels=1, num_classes=10, image_size=28):
        stages = [nn.Sequential(*_conv(in_channels, 16, bn=True), BasicBlock(16, 32, stride=2)),
                  nn.Sequential(BasicBlock(32, 64, stride=2), BasicBlock(64, 64))]
        neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        super().__init__(stages, neck, nn.Linear(64, num_classes))


class TeacherVGG(StagedNet):
    """VGG-style: three double-conv blocks (32, 64, 128 channels) with BatchNorm and
    MaxPool, then Dropout 0.5 and a hidden FC layer (seed: 359K params)."""

    def __init__(self, in_channels=1, num_classes=10, image_size=28):
        widths, cin, stages = [32, 64, 128], in_channels, []
        for w in widths:
            stages.append(nn.Sequential(*_conv(cin, w, bn=True), *_conv(w, w, bn=True, pool=True)))
            cin = w
        side = image_size // 8
        super().__init__(stages, _mlp_neck(128 * side * side, 64, 0.5), nn.Linear(64, num_classes))


class DenseLayer(nn.Module):
    """BN-ReLU-Conv3x3 producing ``growth`` new channels, concatenated to its input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                  nn.Conv2d(cin, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], dim=1)


def _dense_block(cin: int, growth: int, layers: int) -> tuple[nn.Sequential, int]:
    block = nn.Sequential(*[DenseLayer(cin + i * growth, growth) for i in range(layers)])
    return block, cin + layers * growth


def _transition(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2))


class TeacherDenseNet(StagedNet):
    """DenseNet-like: three dense blocks (growth 20, 4 layers each) whose layers
    concatenate their features, joined by 1x1-conv + AvgPool transitions
    (seed: 218K params)."""

    def __init__(self, in_channels=1, num_classes=10, image_size=28, growth=20, layers=4, stem=48):
        stem_conv = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        block1, c = _dense_block(stem, growth, layers)
        trans1 = _transition(c, c // 2)
        block2, c = _dense_block(c // 2, growth, layers)
        trans2 = _transition(c, c // 2)
        block3, c = _dense_block(c // 2, growth, layers)
        stages = [nn.Sequential(stem_conv, block1, trans1), nn.Sequential(block2, trans2),
                  nn.Sequential(block3, nn.BatchNorm2d(c), nn.ReLU(inplace=True))]
        neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        super().__init__(stages, neck, nn.Linear(c, num_classes))


STUDENT_SIZES = (32, 64, 60)  # the student's conv channels and hidden units at width 1


def student_sizes(width: float = 1.0) -> tuple[int, int, int]:
    """The student's (conv1 channels, conv2 channels, hidden units) at ``width``: each of
    ``STUDENT_SIZES`` times ``width``, rounded half up. Raises ValueError when a layer
    would get no unit."""
    sizes = tuple(int(n * width + 0.5) for n in STUDENT_SIZES)
    if width <= 0 or min(sizes) < 1:
        smallest = 0.5 / min(STUDENT_SIZES)
        raise ValueError(f"student width {width}: its layers (conv, conv, hidden) would get {sizes} units and "
                         f"every layer needs one; give a width >= {smallest:g}")
    return sizes


class StudentNet(StagedNet):
    """Light student: 2 conv layers (32, 64 channels) with MaxPool, Dropout 0.25, one
    hidden FC layer (seed: 207K params). ``width`` scales the channels and hidden units
    (``student_sizes``); width 1 is the seed's student, layer for layer."""

    def __init__(self, in_channels=1, num_classes=10, image_size=28, width: float = 1.0):
        c1, c2, hidden = student_sizes(width)
        side = image_size // 4
        stages = [nn.Sequential(*_conv(in_channels, c1, pool=True)),
                  nn.Sequential(*_conv(c1, c2, pool=True))]
        super().__init__(stages, _mlp_neck(c2 * side * side, hidden, 0.25), nn.Linear(hidden, num_classes))


MODELS = {
    "teacher_cnn1": TeacherCNN1,
    "teacher_cnn2": TeacherCNN2,
    "teacher_resnet": TeacherResNet,
    "teacher_vgg": TeacherVGG,
    "teacher_densenet": TeacherDenseNet,
    "student": StudentNet,
}
TEACHERS = [name for name in MODELS if name.startswith("teacher_")]


def build_model(name: str, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                width: float = 1.0) -> StagedNet:
    """Build one of the seed's models by name; ``width`` scales the student only."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: valid names are {', '.join(MODELS)}")
    if name == "student":
        return StudentNet(in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width)
    if width != 1:
        raise ValueError(f"width {width}: only the student has a width (teachers are the seed's, as they are)")
    return MODELS[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class ConvReg(nn.Module):
    """Maps a student feature map [B,Cs,Hs,Ws] to a teacher's [B,Ct,Ht,Wt] (FitNet regressor).

    Conv -> BN -> ReLU, with the kernel chosen by RepDistiller's shape cases
    (CA-MKD ``models/util.py``): stride-2 conv when Hs = 2 Ht, transposed conv when
    2 Hs = Ht, bilinear upsampling first when 4 Hs = Ht, a (1+Hs-Ht)x(1+Ws-Wt) valid
    conv when Hs >= Ht, else a 3x3 same conv. The ReLU is dropped (``use_relu=False``)
    when the teacher's feature can be negative.
    """

    def __init__(self, s_shape, t_shape, use_relu: bool = True):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape[-3:], t_shape[-3:]
        self.upsample_to = (t_h, t_w) if s_h * 4 == t_h else None
        if self.upsample_to:
            s_h, s_w = t_h, t_w
        if s_h == 2 * t_h:
            conv = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
        elif s_h >= t_h:
            conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
        else:
            conv = nn.Conv2d(s_c, t_c, 3, padding=1)
        self.conv, self.bn = conv, nn.BatchNorm2d(t_c)
        self.out_size = (t_h, t_w)
        self.use_relu = use_relu

    def forward(self, x):
        if self.upsample_to:
            x = F.interpolate(x, size=self.upsample_to, mode="bilinear", align_corners=False)
        x = self.conv(x)
        if x.shape[-2:] != self.out_size:  # odd size ratios no kernel case covers exactly
            x = F.adaptive_avg_pool2d(x, self.out_size)
        x = self.bn(x)
        return F.relu(x) if self.use_relu else x


class ConvRegs(nn.Module):
    """One ``ConvReg`` per teacher, run as few convolutions as the shapes allow.

    Teachers whose features have the same spatial size get the same kernel from the
    same student feature, so their regressors are one ``ConvReg`` whose output
    channels are theirs concatenated (conv weights stacked; BatchNorm is per channel,
    so one BN over the concatenation is their BNs side by side). It computes what
    the per-teacher ``ConvReg`` list computes, up to float summation order (tested),
    in one pass instead of M. Built from that list, so a seed draws the same initial
    weights as before and leaves the random stream (dropout masks) where the list left
    it: the fused convs' own initial draw runs in a forked generator and is then
    overwritten. Checkpoints holding the per-teacher keys
    (``regressors.<i>.conv.weight``, ...) load into the fused layout.
    """

    def __init__(self, s_shape, t_shapes, use_relu: bool = True):
        super().__init__()
        per_teacher = [ConvReg(s_shape, t, use_relu) for t in t_shapes]
        self.channels = [t[-3] for t in t_shapes]
        sizes = [tuple(t[-2:]) for t in t_shapes]
        self.members = [[i for i, hw in enumerate(sizes) if hw == size] for size in dict.fromkeys(sizes)]
        with torch.random.fork_rng(devices=[]):  # their own initial draw is overwritten below: keep the
            self.groups = nn.ModuleList(         # seed's stream where the per-teacher list left it
                ConvReg(s_shape, (sum(self.channels[i] for i in m), *sizes[m[0]]), use_relu) for m in self.members)
        self.load_state_dict(self._fused_state({f"{i}.{k}": v for i, r in enumerate(per_teacher)
                                                for k, v in r.state_dict().items()}))

    def __len__(self) -> int:
        return len(self.channels)

    def _fused_state(self, per_teacher: dict) -> dict:
        """Per-teacher ConvReg tensors (keys ``<i>.conv.weight``, ...: a state_dict, or
        gradients) laid out as this module's."""
        fused = {}
        for g, (members, reg) in enumerate(zip(self.members, self.groups)):
            cat_dim = 1 if isinstance(reg.conv, nn.ConvTranspose2d) else 0  # its weight is [in, out, k, k]
            for key, value in reg.state_dict().items():
                if f"{members[0]}.{key}" not in per_teacher:
                    continue  # left for load_state_dict to report as missing
                parts = [per_teacher[f"{i}.{key}"] for i in members]
                fused[f"groups.{g}.{key}"] = (parts[0] if value.ndim == 0 else  # num_batches_tracked
                                              torch.cat(parts, dim=cat_dim if key == "conv.weight" else 0))
        return fused

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict)
               if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
        if old:  # a checkpoint written before the regressors were fused
            state_dict.update({prefix + k: v for k, v in self._fused_state(old).items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x) -> list[torch.Tensor]:
        """One mapped feature per group: [B, sum of its teachers' channels, H, W]."""
        return [reg(x) for reg in self.groups]

    def in_teacher_order(self, per_group) -> list:
        """Items given per group (one per member) as one list in teacher order."""
        out = [None] * len(self)
        for members, items in zip(self.members, per_group):
            for i, item in zip(members, items):
                out[i] = item
        return out

    def split(self, mapped: list[torch.Tensor]) -> list[torch.Tensor]:
        """``forward``'s output as the M per-teacher maps (channel slices, in teacher order)."""
        return self.in_teacher_order(m.split([self.channels[i] for i in members], dim=1)
                                     for members, m in zip(self.members, mapped))


class Embed(nn.Module):
    """The official CA-MKD regressor body (``models/util.py`` ``Embed``, lines 114-141,
    with the defaults ``--factor 2`` and no ``--convs``, ``train_student.py`` lines
    76-77): a 1x1 conv (with bias) from the student's channels to the teacher's, then
    BatchNorm and ReLU. Parameter names as there (``transfer.0.weight``, ...)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.transfer = nn.Sequential(nn.Conv2d(dim_in, dim_out, kernel_size=1), nn.BatchNorm2d(dim_out),
                                      nn.ReLU(inplace=True))

    def forward(self, x):
        return self.transfer(x)


class CalWeight(nn.Module):
    """The official CA-MKD regressors (``models/util.py`` ``CalWeight``, lines 53-81):
    for teacher i, resize the student map to teacher i's spatial size, then ``embed<i>``
    (an ``Embed``) to its channels. ``camkd_form: official`` uses it in place of
    ``ConvRegs``; the teachers' heads, which the official ``forward`` also applies,
    are applied by ``CAMKD`` (it holds the teachers).

    Resizing as the official code: adaptive average pooling when the map is at least
    the teacher's size (an identity at equal size), else bilinear interpolation
    (``align_corners=False``, PyTorch's default there). Also as there, the resized map
    *replaces* the student map for the teachers after it (``feat_s = ...``, lines
    72-75): teacher i's input is the map as resized for teacher i-1. With the teachers
    in non-increasing spatial size this is the same as resizing the student map
    itself (the three-teacher configs: all 7x7 at ``hint_layer: -2``, as the
    student's), but a larger map after a smaller one gets the smaller one upsampled:
    in ``params/fashionmnist_5teachers.yaml``'s order ``teacher_densenet``'s 7x7 input
    is ``teacher_vgg``'s 3x3 one interpolated back to 7x7. The official code sizes
    both sides from the height (square maps, as all of ours are); we use height and
    width.
    """

    def __init__(self, s_shape, t_shapes):
        super().__init__()
        s_c = s_shape[-3]
        self.sizes = [tuple(t[-2:]) for t in t_shapes]
        for i, t in enumerate(t_shapes):
            setattr(self, f"embed{i}", Embed(s_c, t[-3]))

    def __len__(self) -> int:
        return len(self.sizes)

    @staticmethod
    def resize(x: torch.Tensor, size) -> torch.Tensor:
        """The official rule: adaptive average pooling down (or at equal size), bilinear up."""
        if x.shape[-2] >= size[0]:
            return F.adaptive_avg_pool2d(x, size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, x) -> list[torch.Tensor]:
        """The M mapped maps [B, C_i, H_i, W_i], in teacher order."""
        out = []
        for i, size in enumerate(self.sizes):
            x = self.resize(x, size)  # chained, as the official code (see the class docstring)
            out.append(getattr(self, f"embed{i}")(x))
        return out
