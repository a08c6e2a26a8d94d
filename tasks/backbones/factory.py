"""The ``python`` backbone source: the user's own ``module:factory`` (a callable returning an ``nn.Module``,
or ``(module, preprocess)``), imported only where user code may run (:func:`tasks.backbones.source.without_user_code`).
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Any

from tasks.backbones.source import _RUN_CODE, PREPROCESS_FIELDS, BackboneError, CodeNotRun, Source, choices

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
