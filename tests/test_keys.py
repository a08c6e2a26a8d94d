"""The feature key changes when a keyed input changes, and only then."""
from __future__ import annotations

import os

import pytest

from storage.keys import canonical_json, fingerprint
from helpers import split_plans


def keys(cfg) -> dict[str, str]:
    return {s: p.key for s, p in split_plans(cfg).items()}


def test_canonical_json_ignores_key_order_and_whitespace():
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1})


@pytest.mark.parametrize(
    "change",
    [
        {"backbone": {"name": "resnet34"}},
        {"backbone": {"init_seed": 1}},
        {"backbone": {"layers": ["layer3"]}},
        {"backbone": {"layers": ["penultimate", "layer3"]}},
        {"backbone": {"preprocess": {"resize": 36, "crop": 32}}},
        {"backbone": {"preprocess": {"resize": 32, "crop": 32, "interpolation": "bicubic"}}},
        {"backbone": {"preprocess": {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5]}}},
        {"extract": {"dtype": "float32"}},
        {"data": {"seed": 7}},
    ],
)
def test_keyed_inputs_change_every_key(tiny_config, change):
    before, after = keys(tiny_config()), keys(tiny_config(**change))
    assert all(before[s] != after[s] for s in before)


@pytest.mark.parametrize(
    "change",
    [
        {"extract": {"batch_size": 7}},
        {"extract": {"num_workers": 2}},
        {"extract": {"device": "cpu"}},
        {"extract": {"amp": False, "channels_last": False}},
        {"retries": 5},
        {"name": "another-experiment"},
        {"data": {"on_bad_image": "skip"}},
    ],
)
def test_unkeyed_inputs_keep_every_key(tiny_config, change):
    assert keys(tiny_config()) == keys(tiny_config(**change))


def test_weights_file_is_keyed_by_content(tiny_config, tmp_path):
    import torch
    from torchvision.models import get_model

    path = tmp_path / "w.pt"
    torch.save(get_model("resnet18", weights=None).state_dict(), path)
    first = keys(tiny_config(backbone={"weights": str(path)}))
    copy = tmp_path / "copy.pt"
    copy.write_bytes(path.read_bytes())
    assert keys(tiny_config(backbone={"weights": str(copy)})) == first  # same bytes, other path
    torch.manual_seed(1)
    torch.save(get_model("resnet18", weights=None).state_dict(), path)
    assert keys(tiny_config(backbone={"weights": str(path)}))["train"] != first["train"]


def test_editing_one_image_changes_only_its_split(tiny_config):
    cfg = tiny_config()
    plans = split_plans(cfg)
    before = {s: p.key for s, p in plans.items()}
    from tasks.data import Manifest

    manifest = Manifest.load(plans["train"].manifest)
    touched = manifest.root / manifest.splits["test"][0][0]
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    after = keys(cfg)
    assert after["test"] != before["test"]
    assert after["train"] == before["train"] and after["val"] == before["val"]
    content = tiny_config(data={"fingerprint": "content"})
    k1 = keys(content)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert keys(content) == k1  # content fingerprints ignore mtime
