import pytest
import torch

from sdstudio.engine import choose_dtype, cpu_flags
from sdstudio.errors import SdStudioError


def test_auto_precision_follows_the_cpu():
    assert choose_dtype("auto", "cpu", frozenset({"avx2", "fma"})) == torch.float32
    assert choose_dtype("auto", "cpu", frozenset({"avx512f", "avx512_bf16"})) == torch.bfloat16
    assert choose_dtype("auto", "cpu", frozenset({"amx_bf16", "amx_tile"})) == torch.bfloat16
    assert choose_dtype("auto", "cuda") == torch.float16


def test_explicit_precision_and_errors():
    assert choose_dtype("bf16") == torch.bfloat16 and choose_dtype("fp16") == torch.float16
    assert choose_dtype("fp32") == torch.float32
    with pytest.raises(SdStudioError, match="unknown precision 'fp8'"):
        choose_dtype("fp8")


def test_cpu_flags_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()
