"""Peak resident memory of one full fine-tuning step of an sd15-sized model (random weights) at 512x512,
batch 1, bf16 autocast: does a full fine-tune of sd15 fit in 24 GiB, and with which options?

Each case runs in a fresh process (``--case``), which builds the whole model (UNet, text encoder, VAE: what
a run holds, fp32 master weights), then makes one step exactly as ``train_finetune`` does (the method's
``CheckpointedUNet``, ``Denoiser.training_loss`` and the loop's ``build_optimizer`` / ``EMA``): conditioning from
the text encoder, the UNet's forward and backward under bf16 autocast, gradient clipping, the optimizer
step (which allocates its state), the EMA update. The latents are random (a run reads them from the
latent cache, so the VAE only sits in memory). Two steps are made: the first allocates the optimizer
state, the second shows that the peak has settled. ``ru_maxrss`` is the process's peak.

Cases: optimizer ``adamw`` (two fp32 moments: 8 bytes per trained parameter) or ``adamw8bit`` (bitsandbytes,
two 8-bit moments with block-wise scales: about 2 bytes per parameter), gradient checkpointing on or off,
EMA (one fp32 copy of the UNet: 4 bytes per UNet parameter) on or off, text encoder trained or frozen.
A case is skipped, and says why, when ``MemAvailable`` is below its estimate plus a margin: on a shared
machine an out-of-memory kill would take other work with it.

    python benchmarks/finetune_memory.py                       # the default cases, each in its own process
    python benchmarks/finetune_memory.py --case adamw8bit,ckpt,ema
    python benchmarks/finetune_memory.py --arch tiny --size 64 # the plumbing, in seconds
    python benchmarks/finetune_memory.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30
DEFAULT_CASES = (
    "adamw8bit,ckpt",
    "adamw8bit,ckpt,ema",
    "adamw8bit",
    "adamw,ckpt",
    "adamw,ckpt,ema",
    "adamw",
    "adamw8bit,ckpt,ema,text",
    "adamw,ckpt,ema,text",
)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def estimate(arch: str, case: set[str]) -> int:
    """Bytes a case needs, from parameter counts (fp32 weights of all three networks; gradients, optimizer
    state and EMA of the trained ones) plus activations (3 GiB without checkpointing, 1 with: measured at
    sd15 512x512 batch 1 bf16) and 1 GiB of runtime."""
    import torch

    from sdstudio.models.configs import PRESETS
    from sdstudio.models.stablediffusion import StableDiffusion

    with torch.device("meta"):
        counts = StableDiffusion(PRESETS[arch]).parameter_counts()
    total = sum(counts.values())
    trained = counts["unet"] + (counts["text_encoder"] if "text" in case else 0)
    state = 2.1 if "adamw8bit" in case else 8
    scale = 1.0 if arch == "sd15" else total / 1.07e9
    activations = (1 if "ckpt" in case else 3) * GiB * scale
    return int(4 * total + 4 * trained + state * trained + (4 * counts["unet"] if "ema" in case else 0)
               + activations + GiB)  # fmt: skip


def run_case(arch: str, size: int, case: set[str], steps: int) -> dict:
    """One case in this process; returns its figures."""
    import torch

    from sdstudio.diffusion.denoiser import Denoiser
    from sdstudio.diffusion.schedule import DiscreteSchedule
    from sdstudio.models.configs import PRESETS
    from sdstudio.models.stablediffusion import random_model
    from sdstudio.models.tokenizer import ClipTokenizer
    from sdstudio.prompt.conditioning import encode_captions
    from sdstudio.training.dreambooth import CheckpointedUNet
    from sdstudio.training.trainer import EMA, TrainConfig, _param_groups, build_optimizer, ema_decay

    t0 = time.perf_counter()
    config = PRESETS[arch]
    sd = random_model(config, seed=0)  # fp32 master weights, frozen
    after_load = peak_rss()
    train_text = "text" in case
    trained = torch.nn.ModuleDict(
        {"unet": sd.unet} | ({"text_encoder": sd.text_encoder} if train_text else {})
    )
    trained.requires_grad_(True).train()
    tc = TrainConfig(steps=steps, lr=1e-6, warmup=0, optimizer="adamw8bit" if "adamw8bit" in case else "adamw",
                     ema_decay=0.9999 if "ema" in case else 0.0, ema_warmup="ldm")  # fmt: skip
    groups, params = _param_groups(trained.parameters(), tc)
    optimizer = build_optimizer(groups, tc)
    ema = EMA(sd.unet, tc.ema_decay) if tc.ema_decay > 0 else None
    unet = CheckpointedUNet(sd.unet) if "ckpt" in case else sd.unet
    denoiser = Denoiser(unet, DiscreteSchedule.from_config(config.schedule), config.prediction)
    tokenizer = ClipTokenizer()
    generator = torch.Generator().manual_seed(0)
    factor = 2 ** (len(config.vae.ch_mult) - 1)
    latents = torch.randn(1, config.vae.z_channels, size // factor, size // factor, generator=generator)
    step_seconds = []
    peaks = []
    for step in range(steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.set_grad_enabled(train_text):
                context = encode_captions(sd.text_encoder, tokenizer, config.text, ["a photo of sks dog"],
                                          config.text.default_clip_skip)  # fmt: skip
            loss = denoiser.training_loss(latents, context, generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            ema.update(sd.unet, ema_decay(tc, step))
        step_seconds.append(round(time.perf_counter() - t, 1))
        peaks.append(round(peak_rss() / GiB, 2))
    counts = sd.parameter_counts()
    return {
        "case": ",".join(sorted(case)),
        "arch": arch,
        "size": size,
        "parameters": counts,
        "trained_parameters": sum(p.numel() for p in params),
        "peak_rss_gib_after_build": round(after_load / GiB, 2),
        "peak_rss_gib_after_each_step": peaks,
        "peak_rss_gib": peaks[-1],
        "step_seconds": step_seconds,
        "loss_finite": bool(torch.isfinite(loss)),
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", type=int, default=512, help="image side (default 512)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--case", help="one case, run in this process: adamw|adamw8bit[,ckpt][,ema][,text]")
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES))
    parser.add_argument("--margin-gib", type=float, default=2.0, help="free memory kept beyond the estimate")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.arch, args.size, set(args.case.split(",")), args.steps)))
        return 0
    results = []
    for case in args.cases:
        need = estimate(args.arch, set(case.split(",")))
        free = mem_available()
        if need + args.margin_gib * GiB > free:
            row = {
                "case": case,
                "skipped": f"estimated {need / GiB:.1f} GiB, {free / GiB:.1f} GiB available here",
            }
        else:
            cmd = [sys.executable, __file__, "--arch", args.arch, "--size", str(args.size), "--steps",
                   str(args.steps), "--case", case]  # fmt: skip
            done = subprocess.run(
                cmd, check=False, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"}
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                "case": case, "failed": (done.stderr.strip().splitlines() or ["?"])[-1]}  # fmt: skip
            row["estimate_gib"] = round(need / GiB, 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
