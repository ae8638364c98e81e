import pytest
import torch

from sdstudio.engine import choose_dtype, cpu_flags
from sdstudio.errors import SdStudioError
from sdstudio.toyworld.evaluate import SHIPPED_MODEL


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


@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="embedded model not shipped")
def test_bf16_output_matches_fp32_on_the_toy_model():
    """The precision policy's quality guard: the same request in bf16 and in fp32, PSNR >= 30 dB
    (measured 54-56 dB at 20 steps)."""
    import numpy as np

    from sdstudio.engine import Pipeline
    from sdstudio.toyworld.evaluate import psnr
    from sdstudio.types import GenerationRequest

    request = GenerationRequest(
        prompt="a large red circle in the top left, teal background", steps=10, seed=3, batch_size=2
    )
    images = []
    for dtype in (torch.float32, torch.bfloat16):
        result = Pipeline.from_file(SHIPPED_MODEL, dtype=dtype)(request)
        images.append(np.stack([np.asarray(i.image, dtype=np.float64) for i in result.images]))
    per_image = [psnr(a, b) for a, b in zip(*images)]
    assert images[0].std() > 10  # a picture, not a flat field
    assert all(p >= 30 for p in per_image), per_image
