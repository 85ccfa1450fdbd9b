"""The precision choice follows the machine's native bf16 support."""

from __future__ import annotations

import pytest

from anomaly_lab.hardware import cpu_flags, fast_mixed_precision


def test_cpu_flags_are_read_from_the_first_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "absent") == set()


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "fma"}, "32-true"),
    ({"avx2", "avx512f", "avx512bw"}, "32-true"),      # AVX-512 without BF16 still emulates bf16 products
    ({"avx512f", "avx512_bf16"}, "bf16-mixed"),
    ({"amx_bf16", "amx_tile"}, "bf16-mixed"),
])
def test_cpu_runs_use_bf16_only_where_it_is_native(flags, expected):
    assert fast_mixed_precision("cpu", flags) == expected


def test_gpu_runs_without_a_gpu_fall_back_to_float32(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert fast_mixed_precision("gpu", set()) == "32-true"
