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
is remembered in the cache by :func:`tasks.backbones._memo`.
"""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import importlib
import math
import os
import re
import sys
from importlib.machinery import PathFinder
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


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


def get(source: str, search_path: tuple[str, ...] = ()) -> Source:
    """The registered source; ``search_path``: folders searched first for a factory's module (the config's)."""
    try:
        return SOURCES[source].searching(tuple(search_path))
    except KeyError:
        raise BackboneError(f"unknown backbone source {source!r}; valid: {', '.join(SOURCES)}") from None


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


# --------------------------------------------------------------------------- torchvision


class Torchvision(Source):
    name = "torchvision"

    @functools.cache
    def names(self) -> tuple[str, ...]:
        import torchvision
        from torchvision.models import list_models

        return tuple(list_models(module=torchvision.models))

    def check(self, name: str) -> None:
        if name not in self.names():
            raise BackboneError(f"unknown torchvision model {name!r}.{choices(name, self.names())}")

    in_key = False  # torchvision keys are unchanged since v0.1, so their features are reused
    takes_kwargs = False

    def identity(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"torchvision": version("torchvision")}

    def weights_id(self, resolved: str, init_seed: int, digest: Callable[[Path], str]) -> str:
        return resolved  # the enum's name: torchvision versions its weights by name

    def _enum(self, name: str, value: str):
        from torchvision.models import get_model_weights

        enum = get_model_weights(name)
        if value == "DEFAULT":
            return enum.DEFAULT
        short = value.split(".", 1)[1] if value.startswith(enum.__name__ + ".") else value
        if short not in enum.__members__:
            valid = ["DEFAULT", "none", "<path to a weights file>", *enum.__members__]
            raise BackboneError(f"unknown weights {value!r} for {name}.{choices(short, valid)}")
        return enum[short]

    def preprocessing(self, name: str, weights: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        t = self._enum(name, weights).transforms()
        return {"resize": int(t.resize_size[0]), "crop": int(t.crop_size[0]), "interpolation": t.interpolation.value,
                "mean": list(t.mean), "std": list(t.std)}

    def named_weights(self, name: str, weights: str) -> tuple[str, Path | None]:
        w = self._enum(name, weights)
        return f"{type(w).__name__}.{w.name}", None

    def build(self, name: str, kwargs: dict[str, Any], weights: str = "none"):
        from torchvision.models import get_model

        kwargs = dict(kwargs)
        if weights not in ("none", "file"):
            meta = self._enum(name, weights).meta
            kwargs["num_classes"] = len(meta["categories"])
            if name.startswith("vit_"):
                kwargs["image_size"] = meta["min_size"][0]
            if name in ("googlenet", "inception_v3"):
                kwargs.update(aux_logits=True, transform_input=True)
        if name in ("googlenet", "inception_v3"):
            kwargs.setdefault("init_weights", False)  # scipy-based init is slow and we load weights anyway
        return get_model(name, weights=None, **kwargs)

    def hub_file(self, weights: str) -> Path:
        """Where torchvision keeps (and looks for) these weights: $TORCH_HOME/hub/checkpoints/."""
        import torch
        import torchvision

        w = torchvision.models.get_weight(weights)
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)

    def weights_file(self, weights: str) -> Path:
        import torchvision

        path = self.hub_file(weights)
        if not path.is_file():
            url = torchvision.models.get_weight(weights).url
            raise WeightsNotFoundError(
                f"{weights} is not in the torch hub cache and this machine never downloads. "
                f"Put {url} at {path} (the folder follows $TORCH_HOME), "
                f"or set backbone.weights to a local weights file"
            )
        return path


# --------------------------------------------------------------------------- timm


class Timm(Source):
    """Any ``timm.list_models()`` architecture, ``name.tag`` for a pretrained tag; weights from the
    Hugging Face cache, timm's torch-hub cache or a file, never downloaded."""

    name = "timm"

    @functools.cache
    def names(self) -> tuple[str, ...]:
        _require("timm", "timm")
        import timm

        return tuple(timm.list_models())

    def check(self, name: str) -> None:
        _require("timm", "timm")
        arch, _, tag = name.partition(".")
        if arch not in self.names():
            raise BackboneError(f"unknown timm model {arch!r}.{choices(arch, self.names(), show_all=False)} "
                                f"See timm.list_models() for all {len(self.names())}.")
        if tag:
            import timm

            tags = timm.list_pretrained(arch + ".*")
            if name not in tags:
                raise BackboneError(f"timm has no pretrained tag {name!r}.{choices(name, tags)}")

    def identity(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"timm": version("timm")}
        except PackageNotFoundError:
            return {"timm": None}  # check() then says which extra to install

    def build(self, name: str, kwargs: dict[str, Any], weights: str = "none"):
        _require("timm", "timm")
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    def preprocessing(self, name: str, weights: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        _require("timm", "timm")
        import timm.data

        cfg = timm.data.resolve_model_data_config(self.skeleton(name, kwargs))
        crop = int(cfg["input_size"][-1])
        interpolation = cfg["interpolation"] if cfg["interpolation"] in ("nearest", "bilinear", "bicubic") else "bilinear"
        return {"resize": int(math.floor(crop / cfg["crop_pct"])), "crop": crop, "interpolation": interpolation,
                "mean": list(cfg["mean"]), "std": list(cfg["std"])}

    def _pretrained_cfg(self, name: str) -> dict[str, Any]:
        _require("timm", "timm")
        import timm.models

        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None:
            raise BackboneError(f"timm has no pretrained weights for {name!r}; set backbone.weights to none or a file")
        return cfg.to_dict()

    def candidates(self, name: str) -> list[Path]:
        """Where a pretrained timm model may already be on this machine, best first."""
        import torch
        from huggingface_hub import try_to_load_from_cache

        cfg = self._pretrained_cfg(name)
        found: list[Path] = []
        if cfg.get("hf_hub_id"):
            for filename in filter(None, (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin")):
                hit = try_to_load_from_cache(cfg["hf_hub_id"], filename)
                if isinstance(hit, str):
                    found.append(Path(hit))
        if cfg.get("url"):
            found.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg["url"]).path))
        return found

    def named_weights(self, name: str, weights: str) -> tuple[str, Path | None]:
        if weights != "DEFAULT":
            raise BackboneError(f"timm weights are DEFAULT (the tag in the name, {name!r}), none, or a weights file; "
                                f"got {weights!r}. Name a tag as model.tag, e.g. {name.split('.')[0]}.<tag>")
        for path in self.candidates(name):
            if path.is_file() and path.suffix in (".safetensors", ".bin", ".pth", ".pt"):
                return str(path), path
        from huggingface_hub.constants import HF_HUB_CACHE

        cfg = self._pretrained_cfg(name)
        repo = cfg.get("hf_hub_id") or ""
        where = (f"the Hugging Face cache ({HF_HUB_CACHE}, repo {repo})" if repo
                 else f"the torch hub cache ({self.candidates(name)[-1]})")
        raise WeightsNotFoundError(
            f"timm weights for {name} are not in {where} and this machine never downloads. "
            f"On a machine with internet, run python -c \"import timm; timm.create_model('{name}', pretrained=True)\" "
            f"and copy its cache here, or download model.safetensors from https://huggingface.co/{repo} "
            f"and set backbone.weights to its path"
        )

    def classifier(self, model) -> str | None:
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        names = [n for n, m in model.named_modules() if m is head and n]
        return names[0] if names else super().classifier(model)


# --------------------------------------------------------------------------- python


FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class Python(Source):
    """``name: "package.module:factory"``: a callable returning an ``nn.Module``, or ``(module, preprocess)``
    with ``preprocess`` a dict of resize/crop/interpolation/mean/std. The config's folder is searched first."""

    name = "python"
    output_is_feature = True

    def __init__(self, search_path: tuple[str, ...] = ()) -> None:
        self.search_path = tuple(search_path)

    def searching(self, search_path: tuple[str, ...]) -> Source:
        return Python(search_path)

    def weights_id(self, resolved: str, init_seed: int, digest: Callable[[Path], str]) -> str:
        return f"factory(seed={init_seed})"  # as the factory builds it; its code is keyed by code_file

    def code_file(self, name: str) -> Path | None:
        return self.module_file(name)

    def _split(self, name: str) -> tuple[str, str]:
        if not FACTORY.match(name):
            raise BackboneError(f"backbone.name {name!r} for source python must be 'package.module:factory' "
                                f"(a callable returning an nn.Module), e.g. 'my_models:build_backbone'")
        module, attr = name.split(":")
        return module, attr

    def module_file(self, name: str) -> Path | None:
        """The file defining the factory's module, found without importing it."""
        parts = self._split(name)[0].split(".")
        spec = PathFinder.find_spec(parts[0], [*self.search_path, *sys.path])
        for part in parts[1:]:
            if spec is None or not spec.submodule_search_locations:
                return None
            spec = PathFinder.find_spec(part, list(spec.submodule_search_locations))
        return Path(spec.origin) if spec is not None and spec.origin and os.path.isfile(spec.origin) else None

    def factory(self, name: str):
        module_name, attr = self._split(name)
        if not _RUN_CODE.get():
            raise CodeNotRun(
                f"backbone.name {name!r} is code (source: python): `transferpipe plan` neither imports nor calls it. "
                "What plan needs of it (its modules, its preprocessing) is remembered once a run has called it: "
                "`transferpipe run` or `transferpipe extract` runs it"
            )
        added = [p for p in self.search_path if p not in sys.path]
        sys.path[:0] = added
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            where = ", ".join(self.search_path) or "sys.path"
            raise BackboneError(
                f"cannot import {module_name!r} for backbone.name {name!r}: {exc}. Install its package or put "
                f"{module_name.replace('.', '/')}.py in the config's folder ({where})"
            ) from None
        finally:
            for p in added:
                sys.path.remove(p)
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                public = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n))]
                raise BackboneError(f"{module_name} has no {attr!r} (backbone.name {name!r}).{choices(part, public)}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise BackboneError(f"{name} is a {type(obj).__name__}, not a callable returning an nn.Module")
        return obj

    def check(self, name: str) -> None:
        if self.module_file(name) is None and _RUN_CODE.get():
            self.factory(name)  # not a file on the path: importable otherwise, or an error saying why

    def identity(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        path = self.module_file(name)
        if path is None:
            return {"code": None}
        st = path.stat()
        return {"code": {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}}

    def _call(self, name: str, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        from torch import nn

        try:
            out = self.factory(name)(**kwargs)
        except BackboneError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's code: say where it failed
            raise BackboneError(f"{name}(**{kwargs}) failed: {type(exc).__name__}: {exc}") from exc
        module, pre = (out if isinstance(out, tuple) and len(out) == 2 else (out, {}))
        if not isinstance(module, nn.Module):
            raise BackboneError(f"{name} returned {type(module).__name__}; it must return an nn.Module "
                                f"or (nn.Module, preprocess dict)")
        bad = sorted(set(pre) - set(PREPROCESS_FIELDS)) if isinstance(pre, dict) else ["<not a dict>"]
        if bad:
            raise BackboneError(f"{name} returned preprocessing with unknown fields {bad}; valid: {PREPROCESS_FIELDS}")
        return module, pre

    def build(self, name: str, kwargs: dict[str, Any], weights: str = "none"):
        return self._call(name, kwargs)[0]

    def preprocessing(self, name: str, weights: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        import torch

        with torch.random.fork_rng(devices=[]):
            pre = self._call(name, kwargs)[1]
        return {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in pre.items()}

    def named_weights(self, name: str, weights: str) -> tuple[str, Path | None]:
        if weights != "DEFAULT":
            raise BackboneError(f"backbone.weights for source python is DEFAULT (as {name} returns the module), "
                                f"none (seeded random init) or a weights file; got {weights!r}")
        return "factory", None


#: the backbone sources by ``backbone.source`` name: the one registry (config validation lists these)
SOURCES: dict[str, Source] = {source.name: source for source in (Torchvision(), Timm(), Python())}
