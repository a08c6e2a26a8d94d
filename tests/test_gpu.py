"""CUDA paths: AMP, channels_last, pinned memory. Skipped without a CUDA device."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.features import FeatureStore
from helpers import split_plans
from tasks.extract import extract_split

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("amp", [False, True])
def test_cuda_extraction_matches_cpu(tiny_config, tmp_path, amp):
    def features(device: str, cache: str):
        cfg = tiny_config(extract={"device": device, "amp": amp, "dtype": "float32"}, cache_dir=str(tmp_path / cache))
        plan = split_plans(cfg)["train"]
        result = extract_split(plan)
        return result, FeatureStore(cfg.cache_dir).read(plan.key).features["penultimate"]

    cpu_result, cpu = features("cpu", "cpu")
    gpu_result, gpu = features("cuda", "gpu")
    assert cpu_result.key == gpu_result.key  # the device is not part of the key
    tolerance = 5e-2 if amp else 1e-3  # bf16/fp16 autocast
    np.testing.assert_allclose(gpu, cpu, rtol=tolerance, atol=tolerance)
