"""Backbones from the model libraries: ``torchvision`` (the default) and ``timm``, weights read from the
torch hub and Hugging Face caches or a local file, never downloaded.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tasks.backbones.source import BackboneError, Source, WeightsNotFoundError, _require, choices


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
