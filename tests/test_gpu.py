"""The GPU paths, each test run on the CPU too, so that their logic is tested on every machine.

``pytest -m gpu`` runs only the CUDA cases (skipped without a CUDA device); the ``cpu`` cases run in the
normal suite. Tolerances, CUDA against the CPU (docs/GPU.md):

- fp32 extraction (TF32 convolutions, PyTorch's default on Ampere and newer): every row's cosine to the CPU
  row ≥ 0.999 and its largest difference ≤ 1% of the largest feature value;
- AMP (bf16, or fp16 without bf16): cosine ≥ 0.99, largest difference ≤ 10%;
- decoded JPEG pixels: ±1 (nvJPEG's IDCT against libjpeg-turbo's); after the resize and crop on tensors,
  ±3 and a mean difference ≤ 0.5 against the PIL path.

Nothing here imports Prefect: on a lent GPU machine this file runs with torch, h5py, scikit-learn and the
wheels docs/GPU.md lists (``test_the_gpu_kit_needs_no_prefect`` checks that).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FINETUNE_CHILD, blobs, split_plans, state_of, store_split
from storage.features import FeatureStore
from tasks.extract.gpu_decode import decode_jpegs, read_files, to_batch
from tasks.heads.neighbours import KNNHead, knn_search, knn_torch
from tasks.heads.linear import TorchLinearHead
from tasks.extract.stage import extract_split
from tasks.finetune.stage import finetune
from tasks.finetune.plan import run_files
from tasks.machine import forward_precision

REPO = Path(__file__).resolve().parent.parent
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, CUDA])]


def close_rows(got: np.ndarray, want: np.ndarray, cosine: float, largest: float) -> None:
    """Every row points the same way (cosine) and no value is off by more than ``largest`` of the largest."""
    got, want = got.astype(np.float64), want.astype(np.float64)
    cos = (got * want).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-30)
    assert cos.min() >= cosine, f"lowest row cosine {cos.min():.6f} < {cosine}"
    off = np.abs(got - want).max() / np.abs(want).max()
    assert off <= largest, f"largest difference {off:.4f} of the largest value > {largest}"


def extracted(tiny_config, tmp_path: Path, device: str, amp: bool, cache: str):
    cfg = tiny_config(extract={"device": device, "amp": amp, "dtype": "float32"}, cache_dir=str(tmp_path / cache))
    result = extract_split(split_plans(cfg)["train"])
    return result, FeatureStore(cfg.cache_dir).read(result.key).features["penultimate"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow  # seconds of extraction or subprocesses: the full suite runs it
def test_extraction_on_the_device_matches_the_cpu_in_fp32(tiny_config, tmp_path, device):
    cpu_result, cpu = extracted(tiny_config, tmp_path, "cpu", False, "cpu")
    result, got = extracted(tiny_config, tmp_path, device, False, f"on-{device}")
    assert result.key == cpu_result.key  # fp32 on any device shares one key: it differs only by rounding
    assert not result.cache_hit and got.dtype == np.float32
    if device == "cpu":
        np.testing.assert_array_equal(got, cpu)  # the CPU path is deterministic
    close_rows(got, cpu, cosine=0.999, largest=0.01)


@pytest.mark.parametrize("device", DEVICES)
def test_amp_precision_is_in_the_key_and_within_its_looser_tolerance(tiny_config, tmp_path, device):
    fp32_result, fp32 = extracted(tiny_config, tmp_path, device, False, "same")
    amp_result, amp = extracted(tiny_config, tmp_path, device, True, "same")  # the same cache dir
    precision = forward_precision(device, True)
    if precision == "fp32":  # the CPU: the stage autocasts on CUDA only, so AMP changes nothing here
        assert amp_result.key == fp32_result.key and amp_result.cache_hit
        np.testing.assert_array_equal(amp, fp32)
        return
    assert precision in ("bf16", "fp16")
    assert amp_result.key != fp32_result.key and not amp_result.cache_hit  # never one file for both
    store = FeatureStore(tmp_path / "same")
    assert store.path(amp_result.key) != store.path(fp32_result.key)
    assert store.read(amp_result.key).spec["precision"] == precision
    assert store.read(fp32_result.key).spec["precision"] == "fp32"
    close_rows(amp, fp32, cosine=0.99, largest=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_and_knn_heads_predict_the_same_on_the_device(device):
    X, y = blobs(1500, 1)
    Xv, yv = blobs(400, 2)
    X, Xv = X.astype(np.float32), Xv.astype(np.float32)
    params = {"weight_decay": [1e-3, 1e-2], "max_iter": 100}
    on_cpu = TorchLinearHead(**params, device="cpu").fit(X, y, Xv, yv)
    on_device = TorchLinearHead(**params, device=device).fit(X, y, Xv, yv)
    assert on_device.best_param_ == on_cpu.best_param_
    assert np.mean(on_device.predict(Xv) == on_cpu.predict(Xv)) >= 0.995
    np.testing.assert_allclose(on_device.predict_proba(Xv), on_cpu.predict_proba(Xv), atol=2e-3)

    knn_cpu = KNNHead(k=[5, 10], device="cpu").fit(X, y, Xv, yv)
    knn_device = KNNHead(k=[5, 10], device=device).fit(X, y, Xv, yv)
    assert knn_device.best_param_ == knn_cpu.best_param_
    np.testing.assert_array_equal(knn_device.predict(Xv), knn_cpu.predict(Xv))
    # the torch search (the one CUDA runs) against numpy's (the CPU's), on this device, in small chunks
    bank = X / np.linalg.norm(X, axis=1, keepdims=True)
    chunks = lambda: ((b0, bank[b0 : b0 + 128]) for b0 in range(0, len(bank), 128))  # noqa: E731
    sims, idx = knn_torch(Xv, chunks, 10, 128, torch.device(device))
    want_sims, want_idx = knn_search(Xv, bank, 10, 128, "cpu")
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow  # seconds of training or subprocesses: the full suite runs it
def test_streaming_linear_head_moves_its_chunks_to_the_device(tmp_path, device):
    from tasks.heads.stage import load_split

    cache = tmp_path / "cache"
    train, val = store_split(cache, "train", 3000, 1), store_split(cache, "val", 600, 2)
    X, y = load_split(cache, train, "penultimate")
    Xv, yv = load_split(cache, val, "penultimate")
    params = {"weight_decay": [1e-3, 1e-2], "max_iter": 100}
    memory = TorchLinearHead(**params, device="cpu").fit(X, y, Xv, yv)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    streamed = TorchLinearHead(**params, device=device).fit_rows(
        FeatureStore(cache).rows(train, "penultimate"), Xv, yv, chunk_rows=256)
    if device == "cuda":  # the chunks were on the GPU: at least one 256-row float32 chunk was allocated there
        assert torch.cuda.max_memory_allocated() >= 256 * X.shape[1] * 4
    assert streamed.best_param_ == memory.best_param_
    assert np.mean(streamed.predict(Xv) == memory.predict(Xv)) >= 0.995


def jpeg(side: tuple[int, int], seed: int, mode: str = "RGB") -> bytes:
    """A photo-like JPEG (smooth structure and noise) of (height, width)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : side[0], 0 : side[1]] / 50
    img = np.stack([np.sin(rng.uniform(2, 6) * (xx + yy * k) + k) for k in range(3)], -1)
    img = ((img + 1) * 127.5 + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).convert(mode).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("device", DEVICES)
def test_decoding_on_the_device_gives_pils_pixels(tmp_path, device):
    from tasks.backbones.config import BackboneConfig, resolve

    sizes = [(97, 131), (224, 224), (301, 157), (64, 48)]
    paths = []
    for i, side in enumerate(sizes):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(jpeg(side, i, mode="L" if i == 3 else "RGB"))  # a greyscale JPEG comes out RGB too
    decoded = decode_jpegs(read_files(paths), device)
    pils = [Image.open(p).convert("RGB") for p in paths]
    for img, pil, side in zip(decoded, pils, sizes):
        assert img.device.type == device and img.dtype == torch.uint8 and tuple(img.shape) == (3, *side)
        want = torch.from_numpy(np.array(pil)).permute(2, 0, 1).int()
        assert (img.cpu().int() - want).abs().max() <= 1

    pre = resolve(BackboneConfig(name="resnet18", weights="none", preprocess={"resize": 73, "crop": 64}), None).preprocess
    batch = to_batch(decoded, pre)
    assert tuple(batch.shape) == (len(paths), 3, 64, 64) and batch.device.type == device
    want = torch.stack([pre(p) for p in pils]).int()
    diff = (batch.cpu().int() - want).abs()
    assert diff.max() <= 3 and diff.float().mean() <= 0.5, (diff.max(), diff.float().mean())
    assert decode_jpegs([], device) == []


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_fine_tune_epoch_resumes_exactly_after_a_kill(staged, tmp_path, device):
    """kill -9 in the second of three epochs, then resume: the same weights, bit for bit, as a run never killed
    (deterministic kernels: tasks.finetune.loop.deterministic_kernels)."""
    _, _, _, plan = staged
    reference = plan(cache_dir=tmp_path / "reference", device=device)
    crashy = plan(cache_dir=tmp_path / "crashy", device=device)
    assert reference.key == crashy.key
    for p in (reference, crashy):  # both need the probe artifact in their own cache
        src = staged[0].cache_dir / "heads" / p.probes[0]
        (p.cache_dir / "heads").mkdir(parents=True, exist_ok=True)
        os.symlink(src, p.cache_dir / "heads" / p.probes[0])
    finetune(reference)
    spec = tmp_path / "plan.json"
    spec.write_text(crashy.model_dump_json())
    env = {**os.environ, "TRANSFERPIPE_FAULTS": "finetune.batch:5:kill"}  # epoch 2 of 3 (3 batches per epoch)
    proc = subprocess.run([sys.executable, "-c", FINETUNE_CHILD, str(spec)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert (run_files(crashy).last).exists() and not (run_files(crashy).result).exists()
    resumed = finetune(crashy)
    assert resumed.resumed_from == 1 and resumed.epochs_run == 2
    a, b = state_of(run_files(reference).last), state_of(run_files(crashy).last)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h.val_accuracy for h in resumed.history] == [h.val_accuracy for h in finetune(reference).history]


#: packages the lent GPU machine does not have and that do not travel (docs/GPU.md): the kit must not need them
ABSENT = ("prefect", "prefect_dask", "dask", "distributed", "fastapi", "sqlalchemy", "uvicorn")
BLOCK = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {ABSENT!r}:
            raise ImportError(f'{{name}} is not on the GPU machine')
sys.meta_path.insert(0, Absent())
"""


@pytest.mark.slow
def test_the_gpu_kit_runs_without_prefect(tmp_path):
    """What a lent GPU machine runs, run here on the CPU with Prefect and Dask absent: ``benchmarks.gpu --quick``
    (CI's smoke run of it; tests/test_benchmarks.py leaves it to this test) and this file's CPU cases."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    bench = subprocess.run([sys.executable, "-c", BLOCK + "import runpy; sys.argv = ['gpu', '--quick', '--device', 'cpu']; "
                            "runpy.run_module('benchmarks.gpu', run_name='__main__')"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    for group in ("1. extraction from uint8 tensors", "2. extraction from 48 JPEG files", "3. heads", "4. kNN",
                  "5. fine-tuning"):
        assert group in bench.stdout, bench.stdout
    assert "decode_jpeg on cpu" in bench.stdout and "fine-tune epoch, AMP on" in bench.stdout

    tests = subprocess.run([sys.executable, "-c", BLOCK + "import pytest; sys.exit(pytest.main(['-q', '-p', "
                            "'no:cacheprovider', 'tests/test_gpu.py', '-k', 'cpu and (amp or decoding)']))"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert "2 passed" in tests.stdout, tests.stdout[-2000:]
    # the blocker works: the same child cannot import Prefect
    proc = subprocess.run([sys.executable, "-c", BLOCK + "import prefect"], capture_output=True, text=True)
    assert proc.returncode != 0 and "not on the GPU machine" in proc.stderr
