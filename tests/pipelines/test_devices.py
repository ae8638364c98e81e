"""No CPU tensor meets the model's device: the whole sampling path run on a ``meta``-device model (meta
tensors refuse to mix with CPU tensors just as CUDA tensors do), so a CPU-only CI catches what would fail
on a GPU. The GPU itself: tests/test_engine.py::test_cuda_matches_the_cpu_with_and_without_graphs and
benchmarks/gpu.py."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from sdstudio.diffusion.samplers import SamplerStep, _sigma_batch
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.models.configs import PRESETS
from sdstudio.models.loading import LoadedModel
from sdstudio.models.stablediffusion import StableDiffusion
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines.generate import parse_request, source_latents
from sdstudio.pipelines.img2img import prepare_source
from sdstudio.pipelines.sampling import PacedCallback, plan, sample_latents
from sdstudio.prompt.conditioning import encode_conditioning
from sdstudio.types import GenerationRequest, InitImage, Inpaint


@pytest.fixture(scope="module")
def meta_model() -> LoadedModel:
    config = PRESETS["tiny"]
    with torch.device("meta"):
        model = StableDiffusion(config)
    return LoadedModel(model=model.eval(), config=config, path=Path("tiny"), dtype=torch.float32, ema=False)


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC", "LCM"])
def test_txt2img_sampling_stays_on_the_model_device(meta_model, sampler):
    request = GenerationRequest(
        prompt="a [red:blue:2] circle AND a square", negative_prompt="green", sampler=sampler, steps=4, seed=1,
        batch_size=2, width=64, height=64, token_merging_ratio=0.5,
    )  # fmt: skip
    p = plan(meta_model, request)
    with torch.inference_mode():
        cond = encode_conditioning(
            meta_model.model.text_encoder, ClipTokenizer(), meta_model.config.text, *parse_request(request), 1
        )
        latents = sample_latents(meta_model, p, cond, request.steps, request.cfg_scale)
    assert latents.device.type == "meta" and tuple(latents.shape) == (2, 4, 64 // meta_model.config.vae.downsample, 64 // meta_model.config.vae.downsample)


@pytest.mark.parametrize("content", ["original", "latent noise"])
def test_inpainting_sampling_stays_on_the_model_device(meta_model, content):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    request = GenerationRequest(
        prompt="a circle", sampler="Euler", steps=4, seed=1, init=InitImage(init, 0.8),
        inpaint=Inpaint(mask, masked_content=content),
    )  # fmt: skip
    p = plan(meta_model, request)
    src = prepare_source(request, p.width, p.height)
    with torch.inference_mode():
        cond = encode_conditioning(
            meta_model.model.text_encoder, ClipTokenizer(), meta_model.config.text, *parse_request(request), 1
        )
        source, extra = source_latents(meta_model, request, p, src)
        latents = sample_latents(meta_model, p, cond, request.steps, request.cfg_scale, source=source, extra=extra)
    assert latents.device.type == "meta" and tuple(latents.shape) == (1, 4, 64 // meta_model.config.vae.downsample, 64 // meta_model.config.vae.downsample)


def test_sigmas_stay_on_the_cpu_and_the_schedule_moves():
    x = torch.zeros(3, 4, 8, 8, dtype=torch.float64, device="meta")
    sigma = _sigma_batch(x, 2.5)
    assert sigma.device.type == "cpu" and sigma.dtype == torch.float64 and sigma.tolist() == [2.5] * 3
    schedule = DiscreteSchedule.from_config(PRESETS["tiny"].schedule)
    moved = schedule.to("meta")
    assert moved.log_sigmas.device.type == "meta" and schedule.log_sigmas.device.type == "cpu"


def test_paced_callback_reports_a_step_once_the_gpu_finished_it_keeping_one_queued():
    log: list[str] = []

    class Event:  # stands in for torch.cuda.Event
        count = 0

        def __init__(self):
            self.k = Event.count
            Event.count += 1

        def record(self):
            log.append(f"record {self.k}")

        def synchronize(self):
            log.append(f"wait {self.k}")

    paced = PacedCallback(lambda s: log.append(f"report {s.i}"), Event)
    for i in range(3):
        paced(SamplerStep(i, 3, torch.zeros(1), torch.tensor(1.0), torch.zeros(1)))
    assert log == ["record 0", "record 1", "wait 0", "report 0", "record 2", "wait 1", "report 1"]
    paced.flush()
    assert log[-2:] == ["wait 2", "report 2"] and not paced.pending
