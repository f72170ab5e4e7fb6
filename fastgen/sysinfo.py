"""What a measurement ran on: software versions, the source commit, and the GPUs.

Every benchmark file and `fastgen info` report these. Nothing here raises because a piece is
missing (no git checkout, no NVML, no driver, a CPU-only torch): the field says "unknown",
None, or the list is empty.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

# The checkout this package was loaded from (editable installs): fastgen/ sits at its root.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _distribution_version(name: str, missing: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return missing


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=_SOURCE_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def versions() -> dict:
    """python, torch, triton, cuda (torch's CUDA runtime, None for a CPU build), fastgen, and the
    source `commit` (full hash) with `commit_dirty` (tracked files modified; untracked files are
    ignored, as `git describe --dirty` does). A copy of the tree without .git (a lent GPU machine
    gets one) can name its commit in FASTGEN_COMMIT."""
    commit = os.environ.get("FASTGEN_COMMIT") or _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        # Read from the metadata rather than by importing triton: importing it here would fix
        # TRITON_INTERPRET before the CLI or conftest had a chance to set it.
        "triton": _distribution_version("triton", "not installed"),
        "cuda": torch.version.cuda,
        "fastgen": _distribution_version("fastgen", "unknown"),
        "commit": commit,
        "commit_dirty": bool(status),
    }


def _torch_sm_counts() -> dict:
    """Multiprocessor count per CUDA device UUID (NVML's "GPU-" prefix included), so NVML's
    device order and torch's (which CUDA_VISIBLE_DEVICES can change) need not agree."""
    counts = {}
    try:
        for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            props = torch.cuda.get_device_properties(index)
            counts[f"GPU-{props.uuid}".lower()] = props.multi_processor_count
    except Exception:  # a CUDA runtime that fails to initialise leaves sm_count unknown
        pass
    return counts


def gpus() -> list:
    """One dict per GPU that NVML sees: name, uuid, memory_total_gib, driver, sm_count (None when
    torch cannot see the device), sm_clock_max_mhz, mem_clock_max_mhz, compute_capability.
    [] when nvidia-ml-py, the NVML library or a driver is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no module, no libnvidia-ml, no driver: all mean "no GPU information"
        return []
    try:
        sm_counts = _torch_sm_counts()
        return [_describe(pynvml, index, sm_counts) for index in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _describe(pynvml, index: int, sm_counts: dict) -> dict:
    def query(fn, *args):
        # One unsupported query (clocks on some boards) should blank a field, not the GPU.
        try:
            value = fn(*args)
        except pynvml.NVMLError:
            return None
        return value.decode() if isinstance(value, bytes) else value

    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    uuid = query(pynvml.nvmlDeviceGetUUID, handle)
    memory = query(pynvml.nvmlDeviceGetMemoryInfo, handle)
    capability = query(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
    return {
        "name": query(pynvml.nvmlDeviceGetName, handle),
        "uuid": uuid,
        "memory_total_gib": None if memory is None else round(memory.total / 2**30, 2),
        "driver": query(pynvml.nvmlSystemGetDriverVersion),
        "sm_count": sm_counts.get((uuid or "").lower()),
        "sm_clock_max_mhz": query(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM),
        "mem_clock_max_mhz": query(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM),
        "compute_capability": None if capability is None else f"{capability[0]}.{capability[1]}",
    }


def gpu_slug(name: str) -> str:
    """A directory-safe form of a GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
