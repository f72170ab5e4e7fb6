"""Every Triton kernel compiles for sm_90 (H100), checked without a GPU (see
tests/compile_for_hopper.py for how)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastgen


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests compile and run the real kernels")
def test_every_triton_kernel_compiles_for_hopper(tmp_path):
    script = Path(__file__).with_name("compile_for_hopper.py")
    shards = max(1, min(4, os.cpu_count() or 1))
    logs = [tmp_path / f"shard{i}.log" for i in range(shards)]
    processes = [subprocess.Popen([sys.executable, str(script), "--shard", f"{i}/{shards}"],
                                  stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
                 for i, log in enumerate(logs)]
    codes = [p.wait(timeout=1500) for p in processes]
    outputs = [log.read_text() for log in logs]
    if 3 in codes:
        pytest.skip(f"this Triton's internals do not fit the compile-only driver: {outputs[codes.index(3)][-2000:]}")
    for code, output in zip(codes, outputs):
        assert code == 0, output[-20000:]
    compiled = {kernel for output in outputs for kernel in output.split("kernels: ")[1].split("\n")[0].split(", ")}
    assert len(compiled) >= len(fastgen.OPS), compiled
