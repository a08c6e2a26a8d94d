"""What the stages run on: the device (``auto`` means CUDA when torch sees one), the numeric precision
of its forward passes, how much of a split may be held in memory, and library versions."""
from __future__ import annotations

import os
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


MEMORY_ENV = "TRANSFERPIPE_HEADS_MEMORY_GB"


def memory_budget() -> float:
    """Bytes a split may take in memory as float32; above it, heads, retrieval and quality read it in chunks.

    ``$TRANSFERPIPE_HEADS_MEMORY_GB``, else a quarter of the machine's memory.
    """
    value = os.environ.get(MEMORY_ENV)
    if value:
        try:
            return float(value) * 2**30
        except ValueError:
            raise ValueError(f"{MEMORY_ENV}={value!r} is not a number of GB") from None
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4


def pick_device(name: str | torch.device) -> torch.device:
    import torch

    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} is requested but torch sees no CUDA device; use auto or cpu")
    return device


def cuda_possible() -> bool:
    """Whether CUDA may be there, without importing torch on a machine with no NVIDIA driver."""
    if "torch" not in sys.modules and not os.path.exists("/proc/driver/nvidia/version"):
        return False
    import torch

    return torch.cuda.is_available()


#: what a forward pass computes in: plain float32, or autocast to bfloat16 / float16 (AMP, CUDA only)
PRECISIONS = ("fp32", "bf16", "fp16")


def forward_precision(device: str, amp: bool, cpu_bf16: bool = False) -> str:
    """The precision a stage with this ``device``, ``amp`` and ``cpu_bf16`` setting computes in on this machine.

    It is part of the feature and fine-tune keys: AMP runs on CUDA, in bf16
    where the GPU supports it, else fp16; on the CPU, bf16 autocast only when
    asked (``cpu_bf16``: fast on CPUs with AVX512-BF16 or AMX, emulated and
    slower elsewhere); everything else is fp32. The device type is not in the
    keys: fp32 (or bf16) on a GPU and on a CPU differ only by floating-point
    rounding (and TF32 convolutions, PyTorch's default on Ampere and newer
    GPUs). No torch import on a machine without an NVIDIA driver.
    """
    on_cuda = device != "cpu" and cuda_possible()
    if on_cuda:
        import torch

        on_cuda = device == "auto" or torch.device(device).type == "cuda"
    if not on_cuda:
        return "bf16" if cpu_bf16 else "fp32"
    if not amp:
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX) and oneDNN may use it (``DNNL_MAX_CPU_ISA``
    does not cap it below, as the reproducible kernels do): without, oneDNN emulates bf16, 2-25x slower than fp32
    (docs/performance.md#bf16-on-the-cpu)."""
    cap = os.environ.get("DNNL_MAX_CPU_ISA", "ALL").upper()
    if not any(level in cap for level in ("BF16", "AMX", "FP16", "AVX10", "ALL")):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a planned precision (None: plain fp32); refuses AMP planned for a device without it."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type != "cuda" and precision != "bf16":
        raise ValueError(f"this run was planned in {precision} autocast (AMP on CUDA) but runs on {device}: "
                         f"its features would not match its key; set extract.amp/finetune.amp: false or use a GPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def versions() -> dict[str, str]:
    """The versions that produced an artifact (stored with feature files and reports); imports nothing heavy."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "h5py", "transferpipe"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "dev" if package == "transferpipe" else "absent"
    return found


#: ``$TRANSFERPIPE_KERNELS``: which CPU kernels torch (ATen, oneDNN, MKL) and numpy's OpenBLAS may pick, and on how
#: many threads. ``native`` (the default): the fastest this machine has. ``reproducible``: at most AVX2 in every
#: library and 2 threads, so another CPU with AVX2 computes the same bits (measured: AVX2 and AVX-512 EPYCs); how
#: `transferpipe demo` runs (docs/performance.md#reproducibility-across-cpus: what each knob changes, measured).
KERNELS_ENV = "TRANSFERPIPE_KERNELS"
KERNEL_PINS: dict[str, dict[str, str]] = {
    "native": {},
    "reproducible": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                     "OPENBLAS_CORETYPE": "Haswell", "OMP_NUM_THREADS": "2"},
}


def pin_kernels(environ: dict[str, str] | None = None) -> str:
    """Set the libraries' kernel variables that ``$TRANSFERPIPE_KERNELS`` names, as defaults a user's own setting
    overrides; returns the choice. The libraries read them when they load (OpenBLAS with numpy, oneDNN and MKL
    at their first call), so ``flows/__init__.py`` calls this before anything imports them."""
    environ = os.environ if environ is None else environ
    choice = environ.get(KERNELS_ENV, "native")
    if choice not in KERNEL_PINS:  # at import time: a warning, not an exception that no command could explain
        import warnings

        warnings.warn(f"{KERNELS_ENV}={choice!r} is not one of {', '.join(KERNEL_PINS)}: using native", stacklevel=2)
        return "native"
    for name, value in KERNEL_PINS[choice].items():
        environ.setdefault(name, value)
    return choice


def kernels_pinned() -> bool:
    """Whether this process computes with the ``reproducible`` kernels: set before the libraries loaded, and in
    effect."""
    import torch

    pins = KERNEL_PINS["reproducible"]
    return (all(os.environ.get(name) == value for name, value in pins.items())
            and torch.backends.cpu.get_cpu_capability() == "AVX2" and torch.get_num_threads() == 2)


def cpu_description() -> str:
    """The CPU as a person names it, torch's kernel level and its threads: ``AMD EPYC (x86_64), torch CPU
    capability AVX2, 2 threads`` (printed under numbers that depend on it)."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return (f"{model} ({platform.machine()}), torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads")
