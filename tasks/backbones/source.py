"""Where backbones come from: torchvision (default), timm, or the user's own Python factory.

Each source answers the same questions, so the rest of the project never asks
which one it is talking to:

- ``check(name)``: is the name valid (close matches listed when not)?
- ``identity(name, kwargs)``: what beyond the name decides the architecture
  (library version, the factory's source file hash); enters memo keys.
- ``modules(name, kwargs)``: module names, for ``backbone.layers``.
- ``preprocessing(name, weights, kwargs)``: the weights' own preprocessing
  (torchvision's weights enum, timm's data config, the factory's dict).
- ``named_weights(name, weights)``: where named weights (``DEFAULT``, an enum)
  are on this machine, and their identity; never a download.
- ``build(name, kwargs, meta)``: the architecture, no weights loaded (torch).
- ``classifier(model)``: the name of the classifier module, or None.

Only ``build`` and what calls it import torch; everything else a config needs
is remembered in the cache by :func:`tasks.backbones.config._memo`.
"""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PREPROCESS_FIELDS = ("resize", "crop", "interpolation", "mean", "std")


class BackboneError(ValueError):
    """Bad backbone name, weights or layer: the message lists the valid choices."""


class WeightsNotFoundError(BackboneError):
    """Named weights that are not on this machine (nothing is ever downloaded)."""


class MissingExtraError(BackboneError):
    """The source's package is not installed: the message names the extra to install."""


def choices(value: str, valid: list[str] | tuple[str, ...], show_all: bool = True) -> str:
    close = difflib.get_close_matches(value, valid, n=5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return hint + (f" Valid: {', '.join(valid)}" if show_all else "")


def _require(package: str, extra: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError:
        raise MissingExtraError(
            f"backbone source {extra!r} needs the {package!r} package, which is not installed: "
            f"pip install 'transferpipe[{extra}]'"
        ) from None


_RUN_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("transferpipe_run_code", default=True)


class CodeNotRun(BackboneError):
    """A dry run (``transferpipe plan``) needed an answer only the user's factory code can give."""


@contextlib.contextmanager
def without_user_code() -> Iterator[None]:
    """Inside, no factory module named in a config is imported and no factory is called: a dry run (``plan``)
    learns what it needs from what earlier runs remembered in the cache, or says it cannot."""
    token = _RUN_CODE.set(False)
    try:
        yield
    finally:
        _RUN_CODE.reset(token)


class Source:
    """Where a network comes from. Every entry of :data:`SOURCES` answers these (``tests/test_sources.py``
    runs one contract over all of them); nothing outside this module asks which source it is."""

    name = ""
    #: whether the feature key names the source (torchvision's keys predate sources and stay as they were)
    in_key = True
    #: a module without a final Linear has its output as the feature (a factory's), instead of being an error
    output_is_feature = False
    #: ``backbone.kwargs`` are passed to its builder (timm.create_model, a factory)
    takes_kwargs = True

    def searching(self, search_path: tuple[str, ...]) -> Source:
        """This source, looking for modules in ``search_path`` first (only a factory's source cares)."""
        return self

    def label(self, name: str) -> str:
        return f"{self.name}:{name}" if self.in_key else name

    def weights_id(self, resolved: str, init_seed: int, digest: Callable[[Path], str]) -> str:
        """What the key says for named weights, given what :meth:`named_weights` resolved them to: by default
        the hash of the file they are in (``digest``); a source whose names are versioned says the name."""
        return "sha256:" + digest(Path(resolved))

    def code_file(self, name: str) -> Path | None:
        """A file of the user's code that builds the model: its hash enters the key (a factory's module)."""
        return None

    def check(self, name: str) -> None:
        raise NotImplementedError

    def identity(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def modules(self, name: str, kwargs: dict[str, Any]) -> list[str]:
        return [n for n, _ in self.skeleton(name, kwargs).named_modules()]

    def preprocessing(self, name: str, weights: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def named_weights(self, name: str, weights: str) -> tuple[str, Path | None]:
        """``(what the key says, file to hash or None)`` for weights that are neither ``none`` nor a file."""
        raise NotImplementedError

    def build(self, name: str, kwargs: dict[str, Any], weights: str = "none"):
        raise NotImplementedError

    def skeleton(self, name: str, kwargs: dict[str, Any]):
        """The architecture without memory (meta device), for names and shapes."""
        import torch

        try:
            with torch.device("meta"):
                return self.build(name, kwargs)
        except (RuntimeError, NotImplementedError, TypeError, ValueError):  # a few builders touch data at init
            return self.build(name, kwargs)

    def channels_last(self, name: str, kwargs: dict[str, Any], layers: list[str], crop: int) -> list[str]:
        """Layers whose 4-D output is ``(B, H, W, C)`` (Swin's stages), not ``(B, C, H, W)``.

        Found without memory or weights: the architecture runs on the meta device
        at two input sizes, and the channel axis is the one whose size does not
        change. A model that accepts one input size only keeps the default.
        """
        import functools

        import torch
        from torch import nn

        shapes: dict[str, list[tuple[int, ...]]] = {layer: [] for layer in layers}
        try:
            model = self.skeleton(name, kwargs).eval()
            modules = dict(model.named_modules())
            head = self.classifier(model)
            if head is not None:
                model.set_submodule(head, nn.Identity())

            def record(layer: str, _m: Any, _i: Any, output: Any) -> None:
                shapes[layer].append(tuple((output[0] if isinstance(output, tuple) else output).shape))

            for layer in layers:
                if layer != "penultimate":
                    modules[layer].register_forward_hook(functools.partial(record, layer))
            for size in (crop, crop + 64):
                with torch.no_grad():
                    out = model(torch.empty(1, 3, size, size, device="meta"))
                if "penultimate" in shapes:
                    shapes["penultimate"].append(tuple(out.shape))
        except Exception:  # noqa: BLE001 - fixed-size models, builders that need real data: keep the default
            return []
        return sorted(layer for layer, found in shapes.items()
                      if len(found) == 2 and len(found[0]) == 4 and found[0][3] == found[1][3]
                      and found[0][1] != found[1][1])

    def classifier(self, model) -> str | None:
        """The classifier: the last ``nn.Linear`` in module order."""
        from torch import nn

        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return names[-1] if names else None

    def weights_file(self, weights: str) -> Path | None:
        """The file behind resolved named weights (None: the builder has them)."""
        return None
