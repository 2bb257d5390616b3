"""Frozen teachers, served live or from a cache of their outputs.

A distiller asks a bank for the teachers' logits (``logits``) or logits and hint
features (``outputs``) of a batch, passing the batch's row keys. The ``LiveTeachers``
bank runs every teacher on the batch; ``CachedTeachers`` runs them once over a split
(eval mode, un-augmented) and then answers by sample index, so a distillation step
costs little more than a student step; ``ViewCachedTeachers`` does the same for every
augmented view of every training image (``kdlib.data.apply_views``: 25 shifts, 50 with
flips), so a student on augmented images gets its teachers' answer on exactly the
view it sees. All give the same outputs for the same inputs (tested).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .models import StagedNet


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class LiveTeachers(nn.Module):
    """Runs the frozen teachers on every batch."""

    cached = False
    live_hints = True  # hint features (CAMKD's feature term) computed on every batch

    def __init__(self, models: list[StagedNet], names: list[str], hint_layer: int = -2):
        super().__init__()
        if len(models) != len(names):
            raise ValueError("one name per teacher model")
        self.models = nn.ModuleList([freeze(m) for m in models])
        self.names = list(names)
        self.hint_layer = hint_layer
        for m in self.models:
            if m.has_hint:  # own models without a hint serve logits only (CAMKD with beta 0)
                m.check_hint_layer(hint_layer)

    @property
    def has_hints(self) -> bool:
        """Whether every teacher has a hint feature (CAMKD's feature term needs them all)."""
        return all(m.has_hint for m in self.models)

    def train(self, mode: bool = True):
        """Teachers stay in eval mode whatever the caller asks (BatchNorm, Dropout)."""
        return super().train(False)

    def __len__(self) -> int:
        return len(self.models)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, idx: torch.Tensor | None = None, split: str = "train"):
        """``(logits [M,B,C] float32, hints: list of M [B,...] tensors, None for a teacher
        without a hint)`` for batch ``x``."""
        logits, hints = [], []
        for m in self.models:
            out, hint = m.hint_forward(x, self.hint_layer) if m.has_hint else (m(x), None)
            logits.append(out.float())
            hints.append(hint)
        return torch.stack(logits), hints

    def logits(self, x: torch.Tensor, idx: torch.Tensor | None = None, split: str = "train") -> torch.Tensor:
        """The teachers' logits [M,B,C] (float32) for batch ``x``."""
        return self.outputs(x, idx, split)[0]

    def head(self, i: int, feature: torch.Tensor) -> torch.Tensor:
        """Teacher ``i``'s layers after the hint layer applied to ``feature``."""
        return self.models[i].forward_from(feature, self.hint_layer)


def _layout(feature: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last feature map (the student's mapped features
    are too, so the MSE reads both in one order), else contiguous."""
    if feature.ndim == 4 and feature.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class CachedTeachers(LiveTeachers):
    """Teacher outputs computed once per split and looked up by sample index.

    Logits are kept in float32, hint features in ``feature_dtype`` (half precision by
    default: the MSE target only needs about 3 significant digits), and served in it.
    """

    cached = True
    live_hints = False

    def __init__(self, models, names, hint_layer=-2, feature_dtype=torch.float16):
        super().__init__(models, names, hint_layer)
        self.feature_dtype = feature_dtype
        self.store: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    @torch.no_grad()
    def build(self, split: str, num_samples: int, batches) -> None:
        """Fill the cache for ``split`` from an iterable of ``(x, idx)`` batches that
        covers sample indices ``0 .. num_samples-1``."""
        logits, hints, n = None, None, num_samples
        for x, idx in batches:
            out, feats = LiveTeachers.outputs(self, x)
            if logits is None:
                logits = torch.empty((len(self), n, out.shape[-1]), dtype=torch.float32, device=out.device)
                hints = [None if f is None else torch.empty((n, *f.shape[1:]), dtype=self.feature_dtype,
                                                            device=f.device, memory_format=_layout(f))
                         for f in feats]
            logits[:, idx] = out
            for store, f in zip(hints, feats):
                if f is not None:
                    store[idx] = f.to(self.feature_dtype)
        self.store[split] = (logits, hints)

    def nbytes(self) -> int:
        """Memory held by the cache, in bytes."""
        total = 0
        for logits, hints in self.store.values():
            total += logits.element_size() * logits.numel()
            total += sum(h.element_size() * h.numel() for h in hints if h is not None)
        return total

    def outputs(self, x, idx=None, split="train"):
        if split not in self.store:
            return super().outputs(x)
        logits, hints = self.store[split]
        return logits[:, idx], [None if h is None else h[idx] for h in hints]  # in feature_dtype and layout

    def logits(self, x, idx=None, split="train"):
        if split not in self.store:
            return super().logits(x)
        return self.store[split][0][:, idx]


class ViewCachedTeachers(LiveTeachers):
    """The teachers' logits on every augmented view of every training image, looked up
    by row ``view * N + sample`` (the key ``kdlib.train.train_epoch`` passes), with
    ``N`` the training-set size. Hint features are not cached (about 1 GB per view for
    the reference teachers): ``outputs`` runs the teachers live, so CAMKD's feature term
    sees the same view at live cost, and only ``logits`` (vanilla KD) is served from
    memory. ``logits`` [M, V*N, C] float32: 180 MB for 3 teachers, 25 views, 60,000
    images."""

    cached = True

    def __init__(self, models, names, hint_layer=-2, *, logits: torch.Tensor):
        super().__init__(models, names, hint_layer)
        self.view_logits = logits

    def nbytes(self) -> int:
        return self.view_logits.element_size() * self.view_logits.numel()

    def logits(self, x, idx=None, split="train"):
        if split != "train" or idx is None:
            return super().logits(x)
        return self.view_logits[:, idx]
