"""SDXL UNet step time and memory, sdstudio against diffusers, on the same random weights (issue 26).

    python benchmarks/sdxl_step.py                       # 1024x1024, CFG batch 2, both sides
    python benchmarks/sdxl_step.py --size 512 --steps 3
    python benchmarks/sdxl_step.py --only ours --precision bf16
    python benchmarks/sdxl_step.py --arch sdxl-refiner
    python benchmarks/sdxl_step.py --control              # the step with an SDXL ControlNet (overhead)

One step = one UNet evaluation of a CFG pair (batch 2) at the latent size of ``--size`` pixels, with the
SDXL vector y, as a sampler step makes it. Each side runs in its own process (one after the other): the
weights are drawn fan-in-scaled (``tests.reference.randomise_``) from one seed, so both sides hold the same
network. sdstudio runs as its pipeline runs it (``--precision``, channels-last where the CPU prefers it);
diffusers runs ``UNet2DConditionModel`` in fp32 (``--diffusers-precision`` to change), built through its own
single-file converter from the same state dict. Reported: the median seconds per step after one warm-up,
the resident memory of the loaded network, and the peak resident memory during the steps (the kernel's
high-water mark, reset after loading), all from /proc. Needs the test dependencies.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reference: the diffusers bridge


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _inputs(config: Any, size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    from sdstudio.models.sdxl import SizeConditioning, size_vector

    gen = torch.Generator().manual_seed(seed)
    side = size // config.vae.downsample
    x = torch.randn(2, config.unet.in_channels, side, side, generator=gen)
    context = torch.randn(2, 77, config.unet.context_dim, generator=gen)
    refiner = config.conditioner == "sdxl_refiner"
    pooled = torch.randn(2, config.unet.adm_in_channels - 256 * (5 if refiner else 6), generator=gen)
    y = size_vector(pooled, SizeConditioning.of_image(size, size), refiner)
    return x, torch.tensor([500.0, 500.0]), context, y


def _random_sd(arch: str, dtype: torch.dtype) -> Any:
    from sdstudio.models.configs import PRESETS
    from sdstudio.models.stablediffusion import StableDiffusion
    from tests.reference import randomise_

    with torch.device("meta"):
        model = StableDiffusion(PRESETS[arch])
    model.to_empty(device="cpu")
    randomise_(model, seed=0)
    model.model.diffusion_model.requires_grad_(False)
    return model.to(dtype) if dtype != torch.float32 else model


def _time(call: Any, steps: int) -> list[float]:
    call()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _side(side: str, args: argparse.Namespace, out: Any) -> None:
    try:
        torch.set_grad_enabled(False)
        from sdstudio.engine import choose_dtype, prefer_channels_last

        dtype = choose_dtype(args.precision if side == "ours" else args.diffusers_precision)
        model = _random_sd(args.arch, torch.float32 if side == "diffusers" else dtype)
        config = model.config
        x, t, context, y = _inputs(config, args.size)
        if side == "ours":
            unet = model.unet.eval()
            # the text encoders and VAE are not part of a step; drop them as a UNet-only comparison
            del model.conditioner, model.first_stage_model
            if prefer_channels_last(dtype):
                unet.to(memory_format=torch.channels_last)
            control = None
            if args.control:
                control = _our_control(config, unet, dtype, args.size)
            inputs = (x.to(dtype), t, context.to(dtype))

            def call() -> None:
                kwargs = {"y": y.to(dtype)}
                if control is not None:
                    hint = torch.rand(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
                    kwargs["control"] = control(inputs[0], hint.to(dtype), t, inputs[2], y.to(dtype))
                unet(*inputs, **kwargs)
        else:
            from tests.reference import diffusers_unet

            state = model.state_dict()
            del model
            unet = diffusers_unet(config, state).to(dtype)
            del state
            # diffusers embeds the sizes itself: the pooled part of y, and the sizes as time_ids
            refiner = config.conditioner == "sdxl_refiner"
            sizes = [args.size, args.size, 0, 0] + ([6.0] if refiner else [args.size, args.size])
            added = {
                "text_embeds": y[:, : config.unet.adm_in_channels - 256 * len(sizes)].to(dtype),
                "time_ids": torch.tensor([sizes] * 2, dtype=dtype),
            }

            def call() -> None:
                unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added)

        gc.collect()
        weights = _proc_kib("VmRSS")
        _reset_peak()
        times = _time(call, args.steps)
        out.send({
            "side": side, "precision": str(dtype).removeprefix("torch."), "s_per_step": statistics.median(times),
            "times": times, "weights_mib": weights / 1024, "peak_mib": _proc_kib("VmHWM") / 1024,
        })  # fmt: skip
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which prints it
        out.send({"side": side, "error": f"{type(e).__name__}: {e}"})


def _our_control(config: Any, unet: Any, dtype: torch.dtype, size: int) -> Any:
    """An SDXL ControlNet of the model's own shape (random weights), as the pipeline calls it."""
    from sdstudio.models.controlnet import ControlNet, ControlNetConfig
    from tests.reference import randomise_

    with torch.device("meta"):
        net = ControlNet(ControlNetConfig(unet=config.unet))
    net.to_empty(device="cpu")
    randomise_(net, seed=3)
    net = net.to(dtype).eval()
    return lambda x, hint, t, context, y: net(x, hint, t, context, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sdxl", choices=["sdxl", "sdxl-refiner", "tiny-sdxl"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--precision", default="auto", help="sdstudio's (auto: bf16 where the CPU has it)")
    parser.add_argument("--diffusers-precision", default="fp32")
    parser.add_argument("--only", choices=["ours", "diffusers"])
    parser.add_argument("--control", action="store_true", help="sdstudio's step with an SDXL ControlNet")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    for side in [args.only] if args.only else ["ours", "diffusers"]:
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_side, args=(side, args, there))
        proc.start()
        result = here.recv()
        proc.join()
        results.append(result)
        print(json.dumps(result), flush=True)
    ok = [r for r in results if "error" not in r]
    if len(ok) == 2:
        ours, theirs = ok
        print(
            f"{args.arch} {args.size}x{args.size} CFG batch 2 on {platform.processor() or platform.machine()}: "
            f"ours {ours['s_per_step']:.2f} s/step ({ours['precision']}), diffusers {theirs['s_per_step']:.2f} s/step "
            f"({theirs['precision']}): {theirs['s_per_step'] / ours['s_per_step']:.2f}x; peak RSS ours "
            f"{ours['peak_mib'] / 1024:.1f} GiB, diffusers {theirs['peak_mib'] / 1024:.1f} GiB"
        )


if __name__ == "__main__":
    main()
