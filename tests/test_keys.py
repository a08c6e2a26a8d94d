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
    from tasks.data.manifest import Manifest

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


# --------------------------------------------------------------------------- numeric precision


def test_precision_is_in_the_feature_key():
    from storage.keys import feature_key, feature_spec

    fields = dict(backbone="resnet18", weights="none(seed=0)", layers=["penultimate"], pooling="avg",
                  preprocess={}, dataset="d", split="train", dtype="float16")
    by_precision = {p: feature_key(feature_spec(**fields, precision=p)) for p in ("fp32", "bf16", "fp16")}
    assert len(set(by_precision.values())) == 3


def test_a_cpu_plan_says_fp32_whatever_amp_says(tiny_config):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine amp: true plans bf16/fp16 (tests/test_gpu.py)")
    for amp in (True, False):
        for device in ("auto", "cpu"):
            plans = split_plans(tiny_config(extract={"amp": amp, "device": device}))
            assert {p.spec["precision"] for p in plans.values()} == {"fp32"}


def test_amp_planned_but_run_on_a_cpu_is_refused():
    """A plan made in fp16 (AMP on a GPU without bf16) never computes into its key on a CPU: the run says why
    instead. bf16 runs on either (``extract.cpu_bf16``; the device type is not in the keys, as for fp32)."""
    import torch

    from tasks.machine import autocast_dtype

    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="planned in fp16 autocast .* runs on cpu"):
        autocast_dtype("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision 'fp64' is not one of fp32, bf16, fp16"):
        autocast_dtype("fp64", torch.device("cpu"))


def test_finetune_key_names_its_precision(tiny_config):
    from tasks.backbones.config import resolve
    from tasks.finetune.plan import FinetuneConfig, plan_finetune

    cfg = tiny_config()
    plan = plan_finetune(FinetuneConfig(enabled=True, init_head="random"), resolve(cfg.backbone, cfg.cache_dir),
                         split_plans(cfg)["train"].manifest, cfg.cache_dir, {}, [])
    assert plan.spec["precision"] in ("fp32", "bf16", "fp16")
