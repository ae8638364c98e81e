import pytest
import torch

from sdstudio.cpu import cpu_flags
from sdstudio.engine import choose_dtype
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


def test_device_choice_and_errors(monkeypatch):
    from sdstudio.engine import choose_device

    assert choose_device("cpu") == "cpu"
    with pytest.raises(SdStudioError, match="unknown device 'tpu'"):
        choose_device("tpu")
    with pytest.raises(SdStudioError, match="unknown device 'cuda:x'"):
        choose_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == "cpu"
    with pytest.raises(SdStudioError, match="PyTorch sees no CUDA GPU.*--device cpu"):
        choose_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert choose_device("auto") == "cuda" and choose_device("cuda:0") == "cuda:0"
    with pytest.raises(SdStudioError, match="cuda:1: no such GPU; this machine has 1"):
        choose_device("cuda:1")


@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="embedded model not shipped")
def test_cuda_graphs_are_refused_on_the_cpu_and_pass_through_there():
    from sdstudio.engine import Pipeline
    from sdstudio.models.cuda_graphs import CudaGraphRunner

    with pytest.raises(SdStudioError, match="CUDA graphs need a CUDA device"):
        Pipeline.from_file(SHIPPED_MODEL, device="cpu", cuda_graphs=True)
    unet = Pipeline.from_file(SHIPPED_MODEL, device="cpu").model.model.unet
    runner = CudaGraphRunner(unet)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, unet.config.context_dim)
    with torch.inference_mode():
        assert torch.equal(runner(x, t, context), unet(x, t, context))
    assert runner.captured == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.py runs it on a lent one)")
@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="embedded model not shipped")
def test_cuda_matches_the_cpu_with_and_without_graphs():
    """Every step on the GPU (conditioning, noise from the CPU generators, sampler, CFG, VAE) gives the CPU's
    image; replaying CUDA graphs gives the eager GPU image."""
    import numpy as np
    from PIL import Image

    from sdstudio.engine import Pipeline
    from sdstudio.toyworld.evaluate import psnr
    from sdstudio.types import GenerationRequest, Hires, InitImage

    base = {"prompt": "a red circle left of a blue square", "steps": 10, "seed": 5}
    requests = [
        GenerationRequest(**base, batch_size=2),
        GenerationRequest(**base, init=InitImage(Image.new("RGB", (64, 64), (200, 40, 40)), 0.7), vae_tiling=True),
        GenerationRequest(**base, hires=Hires(scale=2.0, steps=4, upscaler="Lanczos"), vae_tiling=True),
    ]
    pipes = {
        "cpu": Pipeline.from_file(SHIPPED_MODEL, dtype=torch.float32),
        "eager": Pipeline.from_file(SHIPPED_MODEL, dtype=torch.float32, device="cuda", cuda_graphs=False),
        "graphs": Pipeline.from_file(SHIPPED_MODEL, dtype=torch.float32, device="cuda"),
    }
    for request in requests:
        images = {
            name: np.stack([np.asarray(i.image, dtype=np.float64) for i in pipe(request).images])
            for name, pipe in pipes.items()
        }
        assert psnr(images["cpu"], images["eager"]) >= 35
        assert psnr(images["eager"], images["graphs"]) >= 45


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="embedded model not shipped")
def test_compiled_unet_gives_the_eager_image():
    """``compile=True`` runs the UNet through torch.compile (inductor) and the image stays the eager one."""
    import numpy as np

    from sdstudio.engine import Pipeline
    from sdstudio.toyworld.evaluate import psnr
    from sdstudio.types import GenerationRequest

    # ngms off: every step a CFG batch of 2, one shape, one compile (the toy model's default NGMS steps
    # run at batch 1, a second compile of about as long)
    request = GenerationRequest(prompt="a red circle", steps=4, seed=1, ngms=0.0)
    images = [
        np.asarray(Pipeline.from_file(SHIPPED_MODEL, dtype=torch.float32, compile=c)(request).images[0].image, dtype=np.float64)
        for c in (False, True)
    ]
    assert psnr(images[0], images[1]) >= 45
