"""The memory figures of the compression report and benchmarks/finetune_speed.py: dozero.runtime reads the
process's resident memory and its peak from /proc/self/status (Linux)."""

from __future__ import annotations

import mmap
import os

import pytest

from dozero.runtime import reset_peak_memory, resident_bytes

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc")


def test_resident_memory_and_its_peak_follow_an_allocation():
    # A fresh anonymous mapping, every page written: a tensor could reuse pages that malloc kept
    # resident after an earlier test freed them, and then the resident size would not move.
    before = resident_bytes("VmRSS")
    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    grown = resident_bytes("VmRSS") - before
    assert 60 * 2**20 < grown < 80 * 2**20
    block.close()
    assert resident_bytes("VmHWM") >= before + 60 * 2**20  # the peak remembers it
    reset_peak_memory()
    assert resident_bytes("VmHWM") < resident_bytes("VmRSS") + 8 * 2**20  # the peak is now what is resident
    assert resident_bytes("NoSuchField") is None


def test_finetune_speed_benchmark_measures_a_peak():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "finetune_speed.py"
    spec = importlib.util.spec_from_file_location("finetune_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.measure("shakespeare-char", "full", steps=1, tokens=16)
    assert row["peak_mib"] >= 0 and row["step_s"] > 0
