"""Speed levers, each on its own (issue 6): one UNet CFG step of a random-weight preset, timed with and
without each lever, everything else equal; then the attention and GroupNorm levers alone, on the
shapes one UNet step runs.

    python benchmarks/levers.py --arch sd15 --latent 64 --runs 2                   # 512x512, auto dtype
    python benchmarks/levers.py --arch sd15 --latent 32 --runs 3 --precision fp32  # 256x256 in fp32
    python benchmarks/levers.py --arch sd15 --latent 64 --runs 2 --compile         # and torch.compile

The default is what sdstudio runs at that precision: in bf16 on CPU, channels-last weights, the
attention policy of ``sdstudio.models.attention`` (sliced on CPUs without AMX, the fused kernel with AMX),
weights prepacked for oneDNN and the GEGLU's GELU and product fused into its products
(``sdstudio.models.prepacked``); in fp32, NCHW and PyTorch's fused SDPA kernel; in both, cond and uncond
in one batched call. Freed memory is kept in the heap, as ``sdstudio generate`` runs on the CPU. Medians in seconds; ratios against the default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.reference: random_unet, cfg_inputs


def _median_seconds(fn: Callable[[], object], runs: int) -> float:
    times = []
    with torch.inference_mode():
        fn()  # warm-up
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved_medians(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Medians of ``fns`` run in turns, one call each per round: this machine drifts by several per cent
    within a process, which sequential medians would book to whichever ran in the slower stretch."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(runs):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument(
        "--compile", action="store_true", help="also time torch.compile (inductor) of the UNet; compiling takes minutes"
    )
    args = parser.parse_args(argv)

    from sdstudio.engine import choose_dtype, prefer_channels_last
    from sdstudio.host_memory import keep_freed_memory
    from sdstudio.models.attention import attention
    from sdstudio.models.configs import PRESETS
    from sdstudio.models.prepacked import Conv2d, Linear
    from sdstudio.models.unet import GEGLU, CrossAttention, GroupNorm32
    from tests.reference import cfg_inputs, random_unet

    keep_freed_memory()  # as ``sdstudio generate`` runs on the CPU
    dtype = choose_dtype(args.precision)
    config = PRESETS[args.arch]
    unet = random_unet(config.unet).to(dtype)
    x, t, context = cfg_inputs(config.unet, args.latent, dtype)
    gen = torch.Generator().manual_seed(1)  # attention and GroupNorm inputs
    channels_last = prefer_channels_last(dtype)

    # The attention calls and GroupNorm inputs of one step, recorded by forward hooks on a first call.
    attention_shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    norm_shapes: list[tuple[int, tuple[int, ...]]] = []

    def on_attention(module: CrossAttention, inputs: tuple) -> None:
        x_in, ctx = inputs[0], inputs[1] if len(inputs) > 1 else inputs[0]
        b, n, _ = x_in.shape
        head_dim = module.to_q.out_features // module.heads
        attention_shapes.append(((b, module.heads, n, head_dim), (b, module.heads, ctx.shape[1], head_dim)))

    def on_norm(module: GroupNorm32, inputs: tuple) -> None:
        norm_shapes.append((module.num_groups, tuple(inputs[0].shape)))

    hooks = [m.register_forward_pre_hook(on_attention) for m in unet.modules() if isinstance(m, CrossAttention)]
    hooks += [m.register_forward_pre_hook(on_norm) for m in unet.modules() if isinstance(m, GroupNorm32)]
    with torch.inference_mode():
        unet(x, t, context)
    for h in hooks:
        h.remove()

    def set_channels_last(on: bool) -> None:
        nonlocal x
        fmt = torch.channels_last if on else torch.contiguous_format
        unet.to(memory_format=fmt)
        x = x.contiguous(memory_format=fmt)

    def batched() -> None:
        unet(x, t, context)

    def separate() -> None:
        unet(x[:1], t[:1], context[:1])
        unet(x[1:], t[1:], context[1:])

    def switched_off(modules: list[torch.nn.Module], switch: str) -> Callable[[], None]:
        """One step with the class switch ``switch`` (``prepack``, ``fuse_gelu``) off on ``modules``."""

        def run() -> None:
            for m in modules:
                setattr(m, switch, False)
            try:
                unet(x, t, context)
            finally:
                for m in modules:
                    delattr(m, switch)  # back to the class default

        return run

    unpacked = switched_off([m for m in unet.modules() if isinstance(m, (Conv2d, Linear))], "prepack")
    geglu_unfused = switched_off([m.proj for m in unet.modules() if isinstance(m, GEGLU)], "fuse_gelu")

    set_channels_last(channels_last)
    default = f"default ({'channels-last' if channels_last else 'NCHW'}, batched CFG)"
    # Taking turns, twice the runs: the lever is worth a few per cent, inside sequential medians' drift.
    step = _interleaved_medians(
        {
            default: batched,
            "weights not prepacked for oneDNN": unpacked,
            "GEGLU not fused (packed projection, then GELU and product)": geglu_unfused,
        },
        2 * args.runs,
    )
    step["two calls instead of batched CFG"] = _median_seconds(separate, args.runs)
    set_channels_last(not channels_last)
    step["NCHW" if channels_last else "channels-last"] = _median_seconds(batched, args.runs)
    set_channels_last(channels_last)
    if args.compile:
        # Inside a compiled graph the attention is the fused SDPA kernel (``prefer_sliced`` says no while
        # compiling): a Python loop over heads and slices would unroll into thousands of nodes.
        compiled = torch.compile(unet)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(x, t, context)
        first_call = time.perf_counter() - t0
        step["torch.compile (inductor)"] = _median_seconds(lambda: compiled(x, t, context), args.runs)
        step["torch.compile: first call (compiling)"] = first_call

    def heads_first(shape: tuple[int, ...]) -> torch.Tensor:
        """[batch, heads, tokens, dim] as ``CrossAttention`` passes it: a transposed, non-contiguous view."""
        b, h, n, d = shape
        return torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2)

    tensors = [[heads_first(s) for s in (q, kv, kv)] for q, kv in attention_shapes]

    def all_attention(sliced: bool | None) -> Callable[[], None]:
        return lambda: [attention(*qkv, sliced=sliced) for qkv in tensors]

    norms = [(g, torch.randn(s, generator=gen).to(dtype)) for g, s in norm_shapes]
    weights = {s[1]: (torch.ones(s[1], dtype=dtype), torch.zeros(s[1], dtype=dtype)) for _, s in norm_shapes}

    def all_norms(upcast: bool) -> Callable[[], None]:
        def run() -> None:
            for g, v in norms:
                w, b = weights[v.shape[1]]
                if upcast:
                    F.group_norm(v.float(), g, w.float(), b.float(), 1e-5).to(dtype)
                else:
                    F.group_norm(v, g, w, b, 1e-5)

        return run

    parts = {
        f"attention, {len(tensors)} calls: default policy (prefer_sliced)": _median_seconds(
            all_attention(None), args.runs
        ),
        f"attention, {len(tensors)} calls: all sliced": _median_seconds(all_attention(True), args.runs),
        f"attention, {len(tensors)} calls: all SDPA fused kernel": _median_seconds(all_attention(False), args.runs),
    }
    if dtype == torch.bfloat16:
        parts[f"GroupNorm, {len(norms)} calls: native bf16"] = _median_seconds(all_norms(False), args.runs)
        parts[f"GroupNorm, {len(norms)} calls: through a float32 copy"] = _median_seconds(all_norms(True), args.runs)
    base = step[default]
    print(json.dumps({
        "arch": args.arch, "image_side": args.latent * 8, "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "seconds_per_cfg_step": {k: round(v, 3) for k, v in step.items()},
        "relative_to_default": {k: round(v / base, 3) for k, v in step.items()},
        "seconds_per_step_of_one_part": {k: round(v, 3) for k, v in parts.items()},
    }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
