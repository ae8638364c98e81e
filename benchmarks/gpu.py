"""sdstudio on a CUDA GPU against diffusers fp16 + SDPA, in one process (issue 6, part 5).

    python benchmarks/gpu.py --out results.json               # everything below, ~4 min on an H100
    python benchmarks/gpu.py --skip-compile --runs 3

Sections, each written to ``--out`` as soon as it ends (a failing one is recorded and the rest go on):

1. ``ceilings``: the GPU, torch, a measured bf16/fp16 matmul rate; the FLOP floor of one sd15 512x512
   image (20 CFG steps at 1.6 TFLOP + a 2.5 TFLOP VAE decode, the issue's counts) at that rate.
2. ``device_paths``: the embedded toy model on the GPU against the CPU, same requests (txt2img with Euler a
   and DPM++ 2M SDE, img2img, inpainting, hires fix), fp32: PSNR of each image pair, with and without CUDA
   graphs. Proves every pipeline path places its tensors right.
3. ``sd15_levers``: a random-weight sd15 at 512x512 in fp16, Euler CFG 7 20 steps, batch 1: seconds per
   image and per step with one kernel launch at a time (eager) and with CUDA graphs, NCHW and channels-last.
4. ``sd15_vs_diffusers``: sdstudio's default CUDA path against diffusers' StableDiffusionPipeline fp16
   (its default SDPA attention), same weights, alternating, batch 1 and 4; peak GPU memory; PSNR of the
   two images of the same seed (both draw the seed's noise on the CPU) and of sdstudio fp16 against fp32.
5. ``compile``: ``torch.compile`` (inductor) inside the CUDA graphs: first image (the compile) and steady
   state at batch 1 and batch 4, each as a multiple of the FLOP floor when ``ceilings`` ran. Skipped with
   ``--skip-compile`` or when ``--budget`` seconds are used up. The shortest run that answers the floor
   target: ``--sections ceilings,compile``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reference: the diffusers bridge

from benchmarks.vs_diffusers import NEGATIVE, PROMPT  # the same request as the CPU benchmark
from tests.reference import a1111_scheduler

TFLOP_PER_IMAGE = 20 * 1.6 + 2.5  # sd15 512x512: 20 CFG steps + VAE decode (issue 6's counts)
# --dry-run: the same code on the CPU with the tiny preset at 64x64, to check the script before a lease
DEVICE, ARCH, SIZE = "cuda", "sd15", 512
IMAGES: dict[str, object] = {}  # seed 42 at the default settings, for the compiled path's comparison


def psnr(a, b) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)


class Clock:
    """Wall time of a request (ends when the PIL images exist, so after the GPU finished) and the GPU
    time between the first and last step callbacks, from CUDA events (no sync inside the loop)."""

    def __init__(self) -> None:
        self.cuda = DEVICE == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        self.events: list = []

    def step(self, *_: object) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        else:
            self.events.append(time.perf_counter())

    def result(self) -> tuple[float, float]:
        total = time.perf_counter() - self.start
        steps = max(1, len(self.events) - 1)
        if not self.cuda:
            return total, (self.events[-1] - self.events[0]) / steps
        torch.cuda.synchronize()
        return total, self.events[0].elapsed_time(self.events[-1]) / 1000 / steps


def summary(times: list[tuple[float, float]], batch: int = 1) -> dict[str, object]:
    request = statistics.median(t for t, _ in times)
    return {
        "seconds_per_image": round(request / batch, 4),
        "seconds_per_step": round(statistics.median(s for _, s in times), 5),
        "all_seconds": [round(t, 4) for t, _ in times],
    }


def request(size: int, batch: int, seed: int, sampler: str = "Euler", **kw: object):
    from sdstudio.types import GenerationRequest

    return GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, sampler=sampler, steps=20, cfg_scale=7.0, seed=seed,
        width=size, height=size, batch_size=batch, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def run_ours(pipe, size: int, batch: int, seed: int, sampler: str = "Euler") -> tuple[tuple[float, float], list]:
    clock = Clock()
    result = pipe(request(size, batch, seed, sampler), callback=clock.step)
    for warning in result.warnings:
        print("sdstudio warning:", warning, flush=True)
    return clock.result(), [im.image for im in result.images]


def ceilings() -> dict[str, object]:
    props = torch.cuda.get_device_properties(0)
    out: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(0),
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    n = 8192
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        rate = 2 * n**3 * 10 / (start.elapsed_time(end) / 1000) / 1e12
        out[f"matmul_tflops_{str(dtype).removeprefix('torch.')}"] = round(rate, 1)
        del a, b
    out["floor_seconds_per_image"] = round(TFLOP_PER_IMAGE / out["matmul_tflops_float16"], 4)  # type: ignore[operator]
    return out


def device_paths() -> dict[str, object]:
    from PIL import Image, ImageDraw

    from sdstudio.cli import embedded_model_path
    from sdstudio.engine import Pipeline
    from sdstudio.types import GenerationRequest, Hires, InitImage, Inpaint

    path = embedded_model_path()
    init = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(init).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    base = {"prompt": "a red circle on a blue background", "negative_prompt": "green", "seed": 7, "steps": 12}
    cases = {
        "txt2img Euler a batch 2": GenerationRequest(**base, batch_size=2),
        "txt2img DPM++ 2M SDE": GenerationRequest(**base, sampler="DPM++ 2M SDE"),
        "img2img": GenerationRequest(**base, sampler="Euler", init=InitImage(init, 0.6)),
        "inpaint": GenerationRequest(**base, sampler="Euler", init=InitImage(init, 0.9), inpaint=Inpaint(mask)),
        "hires fix": GenerationRequest(**base, sampler="Euler", hires=Hires(scale=2.0, steps=6)),
        "hires fix Lanczos, tiled VAE": GenerationRequest(
            **base, sampler="Euler", hires=Hires(scale=2.0, steps=6, upscaler="Lanczos"), vae_tiling=True
        ),
        "img2img, tiled VAE": GenerationRequest(**base, sampler="Euler", init=InitImage(init, 0.6), vae_tiling=True),
        "prompt schedule + AND": GenerationRequest(**{**base, "prompt": "a [red:green:5] circle AND a square"}),
    }
    cpu = Pipeline.from_file(path, dtype=torch.float32, device="cpu")
    eager = Pipeline.from_file(path, dtype=torch.float32, device=DEVICE, cuda_graphs=False)
    graphs = with_runner(Pipeline.from_file(path, dtype=torch.float32, device=DEVICE), True)
    out: dict[str, object] = {}
    for name, req in cases.items():
        ref = [im.image for im in cpu(req).images]
        row = {}
        for label, pipe in (("eager", eager), ("graphs", graphs)):
            got = [im.image for im in pipe(req).images]
            row[f"psnr_{label}_vs_cpu"] = min(psnr(a, b) for a, b in zip(ref, got))
        out[name] = row
    out["graphs_captured"] = graphs.model.unet_runner.captured  # type: ignore[union-attr]
    return out


def time_ours(pipe, runs: int, batch: int = 1) -> dict[str, object]:
    run_ours(pipe, SIZE, batch, 0)  # warm-up (captures the graph)
    return summary([run_ours(pipe, SIZE, batch, i + 1)[0] for i in range(runs)], batch)


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def DTYPE() -> torch.dtype:
    return torch.float16 if DEVICE == "cuda" else torch.float32


def with_runner(pipe, graphs: bool, compile: bool = False):
    """The pipeline with a fresh UNet runner: CUDA graphs (passes through on the CPU), compiled or not."""
    from sdstudio.engine import unet_runner

    runner = unet_runner(pipe.model.model.unet, compile=compile, cuda_graphs=graphs)
    pipe.model = dataclasses.replace(pipe.model, unet_runner=runner)
    return pipe


def sd15_levers(pipe, runs: int) -> dict[str, object]:
    out: dict[str, object] = {}
    default_format = next(pipe.model.model.unet.parameters()).is_contiguous(memory_format=torch.channels_last)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        pipe.model.model.unet.to(memory_format=memory_format)
        pipe.model.model.vae.to(memory_format=memory_format)
        name = "nchw" if memory_format == torch.contiguous_format else "channels_last"
        for graphs in (False, True):  # a fresh runner per format: graphs hold the old weights' addresses
            out[f"{name}_{'graphs' if graphs else 'eager'}"] = time_ours(with_runner(pipe, graphs), runs)
    memory_format = torch.channels_last if default_format else torch.contiguous_format
    pipe.model.model.unet.to(memory_format=memory_format)
    pipe.model.model.vae.to(memory_format=memory_format)
    with_runner(pipe, True)
    return out


class Diffusers:
    """diffusers fp16 (its default SDPA attention) on the GPU, timed by :class:`Clock`."""

    def __init__(self, path: Path, dtype: torch.dtype | None = None) -> None:
        from tests.reference import DiffusersTxt2Img

        self.run = DiffusersTxt2Img(path, PROMPT, NEGATIVE, DEVICE, dtype or DTYPE())
        self.pipe = self.run.pipe
        self.attention = type(next(iter(self.pipe.unet.attn_processors.values()))).__name__

    def __call__(self, size: int, batch: int, seed: int) -> tuple[tuple[float, float], list]:
        clock = Clock()
        images = self.run(size, batch, 20, seed, on_step=clock.step)
        return clock.result(), images


def vs_diffusers(pipe, path: Path, runs: int) -> dict[str, object]:
    diffusers_side = Diffusers(path)
    out: dict[str, object] = {"diffusers_attention": diffusers_side.attention}
    for batch, n in ((1, runs), (4, max(2, runs // 2))):
        ours_times, theirs_times = [], []
        run_ours(pipe, SIZE, batch, 0)
        diffusers_side(SIZE, batch, 0)
        for i in range(n):
            ours_times.append(run_ours(pipe, SIZE, batch, i + 1)[0])
            theirs_times.append(diffusers_side(SIZE, batch, i + 1)[0])
        ours, theirs = summary(ours_times, batch), summary(theirs_times, batch)
        out[f"batch{batch}"] = {
            "sdstudio": ours,
            "diffusers_fp16_sdpa": theirs,
            "speedup_per_image": round(theirs["seconds_per_image"] / ours["seconds_per_image"], 3),  # type: ignore[operator]
            "speedup_per_step": round(theirs["seconds_per_step"] / ours["seconds_per_step"], 3),  # type: ignore[operator]
        }
    # the same image needs the same sigmas: A1111/k-diffusion Euler spaces timesteps from 999 down, diffusers'
    # "leading" Euler from 951; DDIM is the same method in both (as tests/pipelines/test_txt2img_parity.py)
    _, ours_images = run_ours(pipe, SIZE, 1, 42, "DDIM")
    diffusers_side.pipe.scheduler = a1111_scheduler("ddim")
    _, theirs_images = diffusers_side(SIZE, 1, 42)
    out["psnr_sdstudio_vs_diffusers_fp16_ddim"] = psnr(ours_images[0], theirs_images[0])
    del diffusers_side
    empty_cache()
    return out


def quality_guard(path: Path, pipe) -> dict[str, object]:
    from sdstudio.engine import Pipeline

    _, fast = run_ours(pipe, SIZE, 1, 42)
    IMAGES["fp16"] = fast[0]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    full = Pipeline.from_file(path, dtype=torch.float32, device=DEVICE, cuda_graphs=False)
    _, exact = run_ours(full, SIZE, 1, 42)
    del full
    empty_cache()
    return {"psnr_fp16_graphs_vs_fp32": psnr(fast[0], exact[0])}


def parity(path: Path) -> dict[str, object]:
    """DDIM (the same method in both) at seed 42: sdstudio fp32 / default and diffusers fp32 / fp16, each
    pair's PSNR and each image's mean and std (a flat image means NaN/inf became black)."""
    from sdstudio.engine import Pipeline

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    images = {}
    for name, dtype in (("sdstudio_fp32", torch.float32), ("sdstudio_default", DTYPE())):
        pipe = Pipeline.from_file(path, dtype=dtype, device=DEVICE, cuda_graphs=False if dtype == torch.float32 else None)
        images[name] = run_ours(pipe, SIZE, 1, 42, "DDIM")[1][0]
        del pipe
    for name, dtype in (("diffusers_fp32", torch.float32), ("diffusers_fp16", torch.float16)):
        side = Diffusers(path, dtype)
        side.pipe.scheduler = a1111_scheduler("ddim")
        images[name] = side(SIZE, 1, 42)[1][0]
        del side
        empty_cache()
    out: dict[str, object] = {
        name: {"mean": round(float(np.asarray(im).mean()), 2), "std": round(float(np.asarray(im).std()), 2)}
        for name, im in images.items()
    }
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            out[f"psnr {a} vs {b}"] = psnr(images[a], images[b])
    return out


def compiled(path: Path, runs: int, floor_seconds: float | None) -> dict[str, object]:
    """``floor_seconds``: one image at the measured matmul rate (``ceilings``), when it ran."""
    from sdstudio.engine import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.from_file(path, dtype=DTYPE(), device=DEVICE, compile=True)
    run_ours(pipe, SIZE, 1, 0)
    first = time.perf_counter() - start
    out = {"first_image_seconds_with_compile": round(first, 1), **time_ours(pipe, runs)}
    if "fp16" in IMAGES:
        out["psnr_compiled_vs_eager_kernels"] = psnr(run_ours(pipe, SIZE, 1, 42)[1][0], IMAGES["fp16"])
    # Batch 4: the FLOP floor is per image, and a batch of 4 keeps the GPU busier than batch 1 can.
    out["batch4"] = time_ours(pipe, max(2, runs // 2), batch=4)  # its warm-up compiles the new shapes
    if floor_seconds:
        for key, timing in (("batch1", out), ("batch4", out["batch4"])):
            out[f"{key}_times_the_flop_floor"] = round(timing["seconds_per_image"] / floor_seconds, 2)  # type: ignore[index]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_results.json")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--budget", type=float, default=330, help="seconds after which compile is skipped")
    parser.add_argument("--dry-run", action="store_true", help="check the script on the CPU (tiny, 64x64)")
    parser.add_argument("--arch", help="with --dry-run: another preset")
    parser.add_argument("--size", type=int, help="with --dry-run: another size")
    parser.add_argument(
        "--sections", default="ceilings,device_paths,sd15_levers,sd15_vs_diffusers,quality_guard,parity,compile",
        help="comma-separated subset to run",
    )  # fmt: skip
    args = parser.parse_args(argv)
    global DEVICE, ARCH, SIZE
    if args.dry_run:
        DEVICE, ARCH, SIZE = "cpu", args.arch or "tiny", args.size or 64
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark needs one (benchmarks/vs_diffusers.py is the CPU one)")
    start = time.perf_counter()
    results: dict[str, object] = {"command": "python benchmarks/gpu.py " + " ".join(argv or sys.argv[1:])}

    wanted = set(args.sections.split(","))

    def section(name: str, fn: Callable[[], dict[str, object]]) -> None:
        if name not in wanted:
            return
        t0 = time.perf_counter()
        try:
            results[name] = {**fn(), "section_seconds": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # noqa: BLE001 -- record and go on: one lease, several answers
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        results["elapsed_seconds"] = round(time.perf_counter() - start, 1)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"[{results['elapsed_seconds']:7.1f} s] {name}: {json.dumps(results[name])[:1500]}", flush=True)

    from sdstudio.engine import Pipeline
    from tests.reference import write_random_checkpoint

    if DEVICE == "cuda":
        section("ceilings", ceilings)
    section("device_paths", device_paths)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(ARCH, Path(tmp) / f"{ARCH}.safetensors")
        pipe = with_runner(Pipeline.from_file(path, dtype=DTYPE(), device=DEVICE), True)
        section("sd15_levers", lambda: sd15_levers(pipe, args.runs))
        section("sd15_vs_diffusers", lambda: vs_diffusers(pipe, path, args.runs))
        section("quality_guard", lambda: quality_guard(path, pipe))
        section("parity", lambda: parity(path))
        if not args.skip_compile and time.perf_counter() - start < args.budget:
            del pipe
            empty_cache()
            floor = results.get("ceilings", {}).get("floor_seconds_per_image")  # type: ignore[union-attr]
            section("compile", lambda: compiled(path, args.runs, floor))
    print(json.dumps(results, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
