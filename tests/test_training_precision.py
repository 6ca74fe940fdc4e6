"""The precision a run computes in: bf16 autocast only where the CPU has native bf16, and said in the report."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from longlora_hf.training import precision


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n", False),  # AMD EPYC of this project's machines
        ("flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_tile\n", True),  # Sapphire Rapids
        ("flags\t\t: avx2 amx_bf16 amx_tile\n", True),
        ("Features\t: fp asimd sve bf16 i8mm\n", True),  # Arm Neoverse V1
        ("Features\t: fp asimd\n", False),
    ],
    ids=["avx2", "avx512-bf16", "amx", "arm-bf16", "arm-without"],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, cpuinfo, native):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert precision.cpu_has_native_bf16(tmp_path / "cpuinfo") is native


def test_unreadable_cpu_flags_mean_no_native_bf16(tmp_path):
    assert precision.cpu_has_native_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocast_on_a_cpu_without_native_bf16_is_warned_with_the_fix(monkeypatch, native, bf16):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    warning = precision.slow_bf16_warning(SimpleNamespace(bf16=bf16, use_cpu=True))
    if bf16 and not native:
        assert "has no native bf16" in warning and "--bf16 false" in warning
    else:
        assert warning is None


def test_the_precision_names_the_autocast_and_the_weights():
    import torch

    model = torch.nn.Linear(2, 2)
    assert precision.precision(SimpleNamespace(bf16=False, fp16=False), model) == "no autocast, float32 weights"
    assert (
        precision.precision(SimpleNamespace(bf16=True, fp16=False), model.bfloat16())
        == "bf16 autocast, bfloat16 weights"
    )
