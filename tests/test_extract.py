from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from storage.features import FeatureStore
from tasks.backbones.models import build
from tasks.data.errors import BadImageError
from tasks.data.manifest import Manifest
from tasks.data.images import load_rgb
from helpers import split_plans
from tasks.extract.stage import extract_split


def test_feature_file_is_self_describing_and_readable_with_plain_h5py(tiny_config):
    cfg = tiny_config(backbone={"layers": ["penultimate", "layer2"]})
    plan = split_plans(cfg)["train"]
    result = extract_split(plan)
    manifest = Manifest.load(plan.manifest)
    assert result.path == cfg.cache_dir / "features" / f"{plan.key}.h5"
    assert (result.rows, result.dims, result.cache_hit) == (12, {"penultimate": 512, "layer2": 128}, False)
    with h5py.File(result.path, "r") as fh:
        assert fh["features/penultimate"].shape == (12, 512) and fh["features/penultimate"].dtype == np.float16
        assert fh["features/layer2"].shape == (12, 128)
        pieces = sorted({vs.file_name for vs in fh["features/penultimate"].virtual_sources()})
        assert pieces == [f"pieces/{p.key}.h5" for p in plan.pieces]  # joined without copying, relative paths
        for piece in pieces:
            with h5py.File(result.path.parent / piece, "r") as part:
                assert part["features/penultimate"].chunks is not None and part.attrs["complete"]
        assert fh["labels"].dtype == np.int64
        assert list(fh["paths"].asstr()[()]) == [p for p, _ in manifest.splits["train"]]
        assert fh["labels"][()].tolist() == [y for _, y in manifest.splits["train"]]
        attrs = fh.attrs
        assert attrs["complete"] and attrs["key"] == plan.key and attrs["rows_done"] == 12
        assert json.loads(attrs["spec"]) == plan.spec
        assert json.loads(attrs["classes"]) == ["class0", "class1", "class2"]
        assert set(json.loads(attrs["checksums"])) == {"features/layer2", "features/penultimate", "labels", "paths"}
        assert set(json.loads(attrs["versions"])) == {"python", "torch", "torchvision", "h5py", "transferpipe"}
        assert json.loads(attrs["skipped"]) == [] and attrs["created_at"]
        assert attrs["dataset_root"] == str(manifest.root) and attrs["batch_size"] == 4
    assert not list((cfg.cache_dir / "features").glob("*.partial"))
    assert FeatureStore(cfg.cache_dir).verify(plan.key) == []


def test_features_equal_a_direct_forward_pass(tiny_config):
    cfg = tiny_config(extract={"dtype": "float32"})
    plan = split_plans(cfg)["val"]
    extract_split(plan)
    manifest = Manifest.load(plan.manifest)
    pre = plan.backbone.preprocess
    x = torch.stack([pre(load_rgb(manifest.root / p)) for p, _ in manifest.splits["val"]])
    with torch.inference_mode():
        expected = build(plan.backbone)(pre.normalize(x))["penultimate"].numpy()
    stored = FeatureStore(cfg.cache_dir).read(plan.key).features["penultimate"]
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)


def test_second_run_is_a_store_hit_with_no_forward_pass(tiny_config):
    plan = split_plans(tiny_config())["train"]
    first = extract_split(plan)
    assert first.forward_batches == 3  # 12 images in batches of 4
    mtime = first.path.stat().st_mtime_ns
    again = extract_split(plan)
    assert again.cache_hit and again.forward_batches == 0
    assert again.path.stat().st_mtime_ns == mtime


def test_workers_and_batch_size_do_not_change_the_bytes(tiny_config):
    a = extract_split(split_plans(tiny_config(extract={"num_workers": 0}))["train"])
    b_cfg = tiny_config(extract={"num_workers": 2}, cache_dir=str(a.path.parent.parent.parent / "other"))
    b = extract_split(split_plans(b_cfg)["train"])
    assert a.key == b.key
    with h5py.File(a.path) as fa, h5py.File(b.path) as fb:
        assert np.array_equal(fa["features/penultimate"][()], fb["features/penultimate"][()])


def _break_images(root, items):
    """One zero-byte file and one truncated PNG."""
    (root / items[1][0]).write_bytes(b"")
    data = (root / items[4][0]).read_bytes()
    (root / items[4][0]).write_bytes(data[: len(data) // 2])
    return {items[1][0], items[4][0]}


def test_bad_images_fail_the_run_listing_every_path(tiny_config):
    plan = split_plans(tiny_config())["train"]
    manifest = Manifest.load(plan.manifest)
    bad = _break_images(manifest.root, manifest.splits["train"])
    plan = split_plans(tiny_config())["train"]  # the edit changed the fingerprint
    with pytest.raises(BadImageError) as exc:
        extract_split(plan)
    assert all(p in str(exc.value) for p in bad)
    assert FeatureStore(plan.cache_dir).lookup(plan.key) is None


def test_bad_images_are_skipped_and_recorded(tiny_config):
    plan = split_plans(tiny_config())["train"]
    manifest = Manifest.load(plan.manifest)
    bad = _break_images(manifest.root, manifest.splits["train"])
    plan = split_plans(tiny_config(data={"on_bad_image": "skip"}))["train"]
    result = extract_split(plan)
    assert (result.rows, result.skipped) == (10, 2)
    with h5py.File(result.path) as fh:
        skipped = json.loads(fh.attrs["skipped"])
        assert {s["path"] for s in skipped} == bad
        assert not bad & set(fh["paths"].asstr()[()])
        assert fh["features/penultimate"].shape == (10, 512)
    # the cached file holds skipped images: a run that asks for `error` must not use it silently
    with pytest.raises(BadImageError, match="cached as"):
        extract_split(split_plans(tiny_config())["train"])


def test_float16_overflow_is_reported(tiny_config, tmp_path):
    from torchvision.models import get_model

    model = get_model("resnet18", weights=None)
    with torch.no_grad():
        model.layer4[1].bn2.bias.fill_(1e6)  # activations far beyond float16's range
    path = tmp_path / "huge.pt"
    torch.save(model.state_dict(), path)
    plan = split_plans(tiny_config(backbone={"weights": str(path)}))["val"]
    with pytest.raises(ValueError, match="not finite when stored as torch.float16; set extract.dtype: float32"):
        extract_split(plan)


def test_cuda_requested_without_cuda_is_a_clear_error(tiny_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    plan = split_plans(tiny_config(extract={"device": "cuda"}))["val"]
    with pytest.raises(ValueError, match="device 'cuda' is requested but torch sees no CUDA device"):
        extract_split(plan)


def _workers_in_child(queue) -> None:
    from tasks.data.images import num_workers_for

    queue.put((num_workers_for("auto", 100), num_workers_for(3, 100)))


def test_a_daemonic_process_such_as_a_dask_worker_decodes_in_process():
    import multiprocessing

    from tasks.data.images import num_workers_for

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_workers_in_child, args=(queue,), daemon=True)
    child.start()
    assert queue.get(timeout=1800) == (0, 0)  # a daemonic process may not start DataLoader workers
    child.join(timeout=1800)
    assert num_workers_for(3, 100) == 3 and num_workers_for("auto", 2) == 0


def test_cpu_bf16_extracts_in_bf16_autocast_under_its_own_key(tiny_config):
    """Issue 47.3: bf16 on the CPU is opt-in (``extract.cpu_bf16``); its precision is in the feature key, so fp32
    features stay cached beside it, and the stored features are the bf16 autocast forward pass's."""
    fp32 = split_plans(tiny_config(extract={"dtype": "float32"}))["val"]
    bf16 = split_plans(tiny_config(extract={"dtype": "float32", "cpu_bf16": True}))["val"]
    assert (fp32.spec["precision"], bf16.spec["precision"]) == ("fp32", "bf16") and fp32.key != bf16.key
    extract_split(bf16)
    manifest = Manifest.load(bf16.manifest)
    pre = bf16.backbone.preprocess
    x = torch.stack([pre(load_rgb(manifest.root / p)) for p, _ in manifest.splits["val"]])
    model = build(bf16.backbone).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        exact = model(pre.normalize(x).contiguous(memory_format=torch.channels_last))["penultimate"].numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(pre.normalize(x).contiguous(memory_format=torch.channels_last))["penultimate"].float().numpy()
    stored = FeatureStore(bf16.cache_dir).read(bf16.key).features["penultimate"]
    np.testing.assert_allclose(stored, half, rtol=1e-5, atol=1e-5)
    assert np.abs(stored - exact).max() > 1e-4  # bf16 really ran: 8 bits of mantissa, not float32's 23
    np.testing.assert_allclose(stored, exact, rtol=0.1, atol=0.05 * np.abs(exact).max())
