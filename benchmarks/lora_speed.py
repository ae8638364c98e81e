"""What one LoRA in the prompt costs an sd15 image (issue 21: at most 5 % at 512x512, 20 steps), and whether
merging it into the weights or running it as side branches is the faster way.

Run: ``python benchmarks/lora_speed.py [--size 512] [--steps 20] [--dtype auto]``.

A random sd15 model in the dtype ``auto`` picks here and a random rank-16 kohya LoRA on kohya's default targets
(192 UNet + 72 text-encoder linears: ``lora_switch.kohya_default_lora``), written to a file and asked for
through ``GenerationRequest.networks``, so the timed requests include finding, reading and hashing it (first
time) and merging it or restoring the weights (every switch). Images alternate plain / LoRA, after a warm-up.

Side branches (the other design: ``y = W x + up(down(x)) * scale`` computed at every step, as PEFT runs
unmerged adapters and A1111 runs ``lora_*`` modules) are timed on the UNet alone: one CFG step (batch 2) with
and without the branches added by forward hooks, here only; the product merges.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from lora_switch import kohya_default_lora

from sdstudio.adapters import key_table, network_from_state_dict
from sdstudio.cpu import cpu_flags
from sdstudio.engine import Pipeline, choose_dtype, prefer_channels_last
from sdstudio.models.configs import preset
from sdstudio.models.loading import LoadedModel
from sdstudio.models.stablediffusion import random_model
from sdstudio.types import GenerationRequest, NetworkSpec


def side_branch_hooks(model, network) -> list:
    """Forward hooks adding each module's low-rank branch to its output (UNet modules only)."""
    modules = dict(model.named_modules())
    handles = []
    for delta in network.modules:
        if delta.target.part != "unet":
            continue
        module = modules[delta.target.key.removesuffix(".weight")]
        lora = delta.factors
        weight = module.weight
        down = lora.down.reshape(lora.down.shape[0], -1).to(weight.dtype)
        up = (lora.up.reshape(lora.up.shape[0], -1) * lora.scale).to(weight.dtype)

        def hook(mod, args, out, down=down, up=up):
            x = args[0]
            if x.ndim == 4:  # a 1x1 convolution (proj_in / proj_out of SD1): channels as features
                branch = torch.einsum("bchw,rc->brhw", x, down)
                return out + torch.einsum("brhw,or->bohw", branch, up)
            return out + (x @ down.t()) @ up.t()

        handles.append(module.register_forward_hook(hook))
    return handles


def unet_step(model, latent: int, dtype) -> float:
    x = torch.randn(2, 4, latent, latent, dtype=dtype)
    if prefer_channels_last(dtype):
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768, dtype=dtype)
    started = time.perf_counter()
    with torch.inference_mode():
        model.unet(x, t, context)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=2, help="plain / LoRA image pairs timed")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument("--skip-images", action="store_true", help="only the side-branch comparison")
    args = parser.parse_args()
    dtype = choose_dtype(args.dtype)
    flags = cpu_flags()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {dtype}, "
          f"AMX {'amx_bf16' in flags}, AVX-512 BF16 {'avx512_bf16' in flags}")  # fmt: skip
    model = random_model(preset("sd15"), dtype=dtype)
    if prefer_channels_last(dtype):
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    table = key_table(model)
    state = kohya_default_lora(table, args.rank, seed=1)
    network = network_from_state_dict(state, table, name="bench")

    # side branches against merged weights, per UNet step
    latent = args.size // 8
    unet_step(model, latent, dtype)  # warm-up: packs the weights
    plain = [unet_step(model, latent, dtype) for _ in range(3)]
    handles = side_branch_hooks(model, network)
    branches = [unet_step(model, latent, dtype) for _ in range(3)]
    for handle in handles:
        handle.remove()
    p, b = statistics.median(plain), statistics.median(branches)
    print(f"UNet CFG step {args.size}x{args.size}: merged (plain weights) {p:.3f} s, side branches {b:.3f} s "
          f"(+{100 * (b / p - 1):.1f} % per step, x{args.steps} steps: +{(b - p) * args.steps:.1f} s per image)")  # fmt: skip
    if args.skip_images:
        return

    loaded = LoadedModel(model=model, config=model.config, path=Path("sd15-random"), dtype=dtype, ema=False)
    pipeline = Pipeline(loaded)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.safetensors"
        save_file(state, str(path))
        base = GenerationRequest("a photo of a cat", steps=args.steps, width=args.size, height=args.size, seed=1)
        with_lora = GenerationRequest(
            base.prompt, steps=args.steps, width=args.size, height=args.size, seed=1,
            networks=(NetworkSpec("bench", 1.0, path=str(path)),),
        )  # fmt: skip
        pipeline(GenerationRequest("warm-up", steps=1, width=args.size, height=args.size, seed=1))
        times: dict[str, list[float]] = {"plain": [], "lora": []}
        for _ in range(args.pairs):
            for label, request in (("plain", base), ("lora", with_lora)):
                started = time.perf_counter()
                pipeline(request)
                times[label].append(time.perf_counter() - started)
                print(f"  {label:5s} {times[label][-1]:.2f} s", flush=True)
    p, lora = statistics.median(times["plain"]), statistics.median(times["lora"])
    print(f"image {args.size}x{args.size}, {args.steps} steps: plain {p:.2f} s, with the LoRA {lora:.2f} s "
          f"({100 * (lora / p - 1):+.1f} %; each LoRA request reads or merges, each plain one restores)")  # fmt: skip


if __name__ == "__main__":
    main()
