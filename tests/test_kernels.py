"""Issue 46: $TRANSFERPIPE_KERNELS pins the CPU kernels of torch and numpy before they load, so the demo's numbers
are the same bits on another CPU with AVX2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.machine import KERNEL_PINS, KERNELS_ENV, pin_kernels

REPO = Path(__file__).resolve().parents[1]


def test_the_reproducible_choice_sets_each_library_variable_and_a_users_own_setting_wins():
    env = {KERNELS_ENV: "reproducible", "OMP_NUM_THREADS": "1"}
    assert pin_kernels(env) == "reproducible"
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["DNNL_MAX_CPU_ISA"] == "AVX2"
    assert env["OPENBLAS_CORETYPE"] == "Haswell" and env["OMP_NUM_THREADS"] == "1"
    native = {}
    assert pin_kernels(native) == "native" and native == {}


def test_an_unknown_choice_warns_and_changes_nothing():
    env = {KERNELS_ENV: "fast"}
    with pytest.warns(UserWarning, match=r"TRANSFERPIPE_KERNELS='fast' is not one of native, reproducible"):
        assert pin_kernels(env) == "native"
    assert env == {KERNELS_ENV: "fast"}


@pytest.mark.skipif("avx2" not in Path("/proc/cpuinfo").read_text(), reason="the pin needs a CPU with AVX2")
def test_importing_transferpipe_pins_torch_and_openblas_before_they_load():
    probe = ("import flows, json, numpy, threadpoolctl, torch\n"
             "from tasks.machine import kernels_pinned\n"
             "blas = [i.get('architecture') for i in threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas']\n"
             "print(json.dumps([torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), blas, "
             "kernels_pinned()]))")
    env = {k: v for k, v in __import__("os").environ.items() if k not in {*KERNEL_PINS["reproducible"], KERNELS_ENV}}
    done = subprocess.run([sys.executable, "-c", probe], env={**env, KERNELS_ENV: "reproducible"}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    capability, threads, blas, pinned = json.loads(done.stdout.splitlines()[-1])
    assert (capability, threads, pinned) == ("AVX2", 2, True)
    assert all(arch == "Haswell" for arch in blas), blas


def test_bf16_on_the_cpu_is_asked_for_not_automatic():
    """Issue 47.3: amp is CUDA's; a CPU computes in bf16 only with cpu_bf16, on any CPU (the key says so)."""
    from tasks.machine import autocast_dtype, forward_precision

    import torch

    assert forward_precision("cpu", True) == "fp32"
    assert forward_precision("cpu", False, cpu_bf16=True) == "bf16"
    if not torch.cuda.is_available():
        assert forward_precision("auto", True, cpu_bf16=True) == "bf16"
        assert forward_precision("auto", True) == "fp32"
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="planned in fp16 autocast"):
        autocast_dtype("fp16", torch.device("cpu"))


def test_bf16_is_not_fast_where_onednn_is_capped_below_it(monkeypatch):
    from tasks.machine import cpu_has_fast_bf16

    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # the reproducible kernels: bf16 emulated even on a CPU with it
    assert cpu_has_fast_bf16() is False
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE_BF16")
    flags = Path("/proc/cpuinfo").read_text()
    assert cpu_has_fast_bf16() is ("avx512_bf16" in flags or "amx_bf16" in flags)
