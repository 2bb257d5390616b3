"""Your own models: any ``nn.Module`` named by import path (``module:callable``), its hint
feature reached through a forward hook.

``HookedNet`` gives an own module the interface the distillers use of the book's
``StagedNet`` (``hint_forward``, ``forward_from``, ``check_hint_layer``): ``hint_forward``
runs the module and keeps the output of the submodule named by ``hint`` (a dotted path such
as ``layer3`` or ``features.2``); ``forward_from`` runs the module with that submodule's
output replaced by a given feature, so the layers after it finish the pass (CAMKD applies a
teacher's head to the student's mapped feature). The layers before the hint run on a zero
batch there and their result is discarded; ``check_model`` verifies on one batch that the
logits then come out as the plain forward pass gives them, which holds when nothing after
the hint reads an activation from before it (a ResNet's ``layer3``, not a conv inside a
residual block).

``build_own`` imports and calls the callable (with ``num_classes`` and ``in_channels`` from
the data when its signature takes them and ``kwargs`` does not set them), checks it returns
an ``nn.Module``, and loads a ``checkpoint`` (a ``state_dict``, ``weights_only=True``).
Every bad input is a ``ModelSpecError`` of one line naming where it was given.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from pathlib import Path

import torch
import torch.nn as nn


class ModelSpecError(ValueError):
    """An own model that cannot be used as given (one line: where, what, the fix)."""


def import_callable(target: str, code_dir: str | Path | None, where: str):
    """The callable ``module:callable`` names, imported with ``code_dir`` first on ``sys.path``."""
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise ModelSpecError(f"{where}: model {target!r} is not 'module:callable'; give e.g. 'mynets:Big' "
                             "(mynets.py beside the params file) or 'torchvision.models:resnet18'")
    module_name, attr = target.split(":")
    if code_dir is not None:
        folder = str(Path(code_dir).resolve())
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or an error raised by the module's own code
        raise ModelSpecError(f"{where}: model {target!r}: module {module_name!r} does not import "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                             f"searched {code_dir or 'the Python path'} first") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, names, n=3)
            raise ModelSpecError(f"{where}: model {target!r}: module {module_name!r} has no {attr!r}"
                                 + (f"; did you mean {', '.join(close)}?" if close else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"{where}: model {target!r} is not callable")
    return obj


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def closest_modules(model: nn.Module, path: str, n: int = 3) -> list[str]:
    names = [name for name, _ in model.named_modules() if name]
    return difflib.get_close_matches(path, names, n=n, cutoff=0.3) or names[:n]


def submodule(model: nn.Module, path: str, where: str) -> nn.Module:
    """The submodule at dotted ``path``, or one line naming the closest names."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        close = closest_modules(model, path)
        raise ModelSpecError(f"{where}: hint {path!r} is not a submodule of {type(model).__name__}; "
                             f"closest: {', '.join(close)}") from None


class HookedNet(nn.Module):
    """An own module with the book's model interface; ``net`` is the module itself (a
    checkpoint of it loads into ``net``), ``hint`` the dotted path of its hint submodule or
    None, ``input_shape`` the ``(C, H, W)`` of the data it was built for."""

    def __init__(self, net: nn.Module, hint: str | None, input_shape, where: str = "model"):
        super().__init__()
        self.net = net
        self.hint = hint or None
        self.where = where
        self.input_shape = tuple(input_shape)
        if self.hint:
            submodule(net, self.hint, where)

    @property
    def has_hint(self) -> bool:
        return self.hint is not None

    def check_hint_layer(self, hint_layer: int = -2) -> None:
        """Own models name their hint by path; ``hint_layer`` (the built-in models' index) is not read."""
        if not self.has_hint:
            raise ValueError(f"{self.where} has no hint: CAMKD's feature term needs the dotted path of the "
                             "submodule whose output it matches (hint: ...), or beta 0")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def hint_forward(self, x: torch.Tensor, hint_layer: int = -2):
        """``(logits, the hint submodule's output)`` on batch ``x``."""
        self.check_hint_layer()
        kept = []
        handle = self.net.get_submodule(self.hint).register_forward_hook(lambda m, i, out: kept.append(out))
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        if len(kept) != 1:
            raise ValueError(f"{self.where}: hint {self.hint!r} ran {len(kept)} times in one forward pass; "
                             "choose a submodule that runs once")
        return logits, kept[0]

    def forward_from(self, feature: torch.Tensor, hint_layer: int = -2) -> torch.Tensor:
        """The logits the layers after the hint compute from ``feature`` (the hint's output
        replaced by it; the layers before run on a zero batch and are discarded)."""
        self.check_hint_layer()
        handle = self.net.get_submodule(self.hint).register_forward_hook(lambda m, i, out: feature)
        try:
            dtype = next(iter(self.net.parameters()), feature).dtype
            zeros = torch.zeros((feature.shape[0], *self.input_shape), device=feature.device, dtype=dtype)
            return self.net(zeros)
        finally:
            handle.remove()


def build_own(spec: dict, in_channels: int, num_classes: int, image_size: int, code_dir=None,
              where: str = "model", load: bool = True) -> HookedNet:
    """The module ``spec`` names (``model``, ``kwargs``, ``checkpoint``, ``hint``) for data of
    ``in_channels`` x ``image_size``^2 and ``num_classes`` classes, its checkpoint loaded
    (when given and ``load``), wrapped as a ``HookedNet``. Relative checkpoints are found
    in ``code_dir``."""
    fn = import_callable(spec["model"], code_dir, where)
    kwargs = dict(spec.get("kwargs") or {})
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key not in kwargs and _accepts(fn, key):
            kwargs[key] = value
    try:
        net = fn(**kwargs)
    except Exception as err:
        raise ModelSpecError(f"{where}: model {spec['model']!r} called with {kwargs} raised "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(net, nn.Module):
        raise ModelSpecError(f"{where}: model {spec['model']!r} returned a {type(net).__name__}, not a torch "
                             "nn.Module; name a class or function that builds the module")
    if load and spec.get("checkpoint"):
        load_weights(net, checkpoint_path(spec["checkpoint"], code_dir), where)
    return HookedNet(net, spec.get("hint"), (in_channels, image_size, image_size), where)


def checkpoint_path(path: str | Path, code_dir=None) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() or code_dir is None else Path(code_dir) / path


def load_weights(net: nn.Module, path: Path, where: str) -> None:
    """Load the ``state_dict`` in ``path`` (``weights_only=True``; a dict holding it under
    ``state_dict`` or ``model`` is taken too) into ``net``, strictly."""
    if not path.is_file():
        raise ModelSpecError(f"{where}: checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelSpecError(f"{where}: checkpoint {str(path)!r} does not load with weights_only=True "
                             f"({type(err).__name__}); save the module's state_dict: "
                             "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict) and not any(torch.is_tensor(v) for v in state.values()):
                state = state[key]
    if not isinstance(state, dict):
        raise ModelSpecError(f"{where}: checkpoint {str(path)!r} holds a {type(state).__name__}, not a state_dict")
    ours = net.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    wrong = [k for k in ours if k in state and torch.is_tensor(state[k]) and state[k].shape != ours[k].shape]
    if missing or unexpected or wrong:
        def some(keys):
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        parts = ([f"missing keys {some(missing)}"] if missing else []) + \
                ([f"unexpected keys {some(unexpected)}"] if unexpected else []) + \
                ([f"other shapes at {some(wrong)}"] if wrong else [])
        raise ModelSpecError(f"{where}: checkpoint {str(path)!r} does not fit {type(net).__name__}: "
                             f"{'; '.join(parts)}; check model and kwargs")
    net.load_state_dict(state)


@torch.no_grad()
def check_model(model: nn.Module, in_channels: int, image_size: int, num_classes: int, where: str,
                need_hint: bool = False) -> None:
    """One batch through ``model`` (eval mode, state restored): its output must be [B,
    num_classes]; with a hint, the hint must be a feature map [B, C, H, W] computed once, and
    the layers after it must give the same logits from it alone (``HookedNet.forward_from``)."""
    was_training = model.training
    model.eval()
    try:
        device = next(iter(model.parameters()), torch.zeros(())).device
        x = torch.randn(2, in_channels, image_size, image_size, device=device)
        try:
            out = model(x)
        except Exception as err:
            raise ModelSpecError(f"{where}: one batch of {in_channels}x{image_size}x{image_size} images fails "
                                 f"in its forward pass ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''})") from None
        if not torch.is_tensor(out) or out.ndim != 2 or out.shape[0] != 2:
            shape = list(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ModelSpecError(f"{where}: returns {shape} for a batch of 2 images; it must return logits "
                                 f"[batch, {num_classes}]")
        if out.shape[1] != num_classes:
            raise ModelSpecError(f"{where}: returns {out.shape[1]} classes; the data has {num_classes}: "
                                 f"build it with num_classes={num_classes}")
        if not isinstance(model, HookedNet):
            return
        if need_hint and not model.has_hint:
            model.check_hint_layer()
        if not model.has_hint:
            return
        try:
            logits, feature = model.hint_forward(x)
        except ValueError as err:
            raise ModelSpecError(str(err)) from None
        if not torch.is_tensor(feature) or feature.ndim != 4:
            shape = list(feature.shape) if torch.is_tensor(feature) else type(feature).__name__
            raise ModelSpecError(f"{where}: hint {model.hint!r} gives {shape}; CAMKD's regressors match feature "
                                 "maps [batch, channels, height, width]: choose a convolutional stage")
        again = model.forward_from(feature)
        if not torch.allclose(again, logits, rtol=1e-4, atol=1e-4):
            raise ModelSpecError(f"{where}: the layers after hint {model.hint!r} also read activations from "
                                 "before it (a skip connection around it), so a teacher's head cannot run from "
                                 "that feature alone; choose a submodule whose output alone determines the "
                                 "logits, such as a whole stage")
    finally:
        model.train(was_training)
