"""How long merging a LoRA into sd15's weights, switching to another and restoring take (issue 21: a switch
between two LoRAs must cost < 1 s on sd15). Run: ``python benchmarks/lora_switch.py [--dtype float16] [--keep-originals]``
(``OMP_NUM_THREADS=1`` on a machine whose other processes keep a core busy: see ``sdstudio/threads.py``).

Two random rank-16 kohya LoRAs on kohya's default targets (every attention/projection/feed-forward linear
of the 16 transformers: 192 UNet modules; q/k/v/out and both MLP linears of the 12 CLIP layers: 72), on a
random sd15 model in the dtype asked for.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sdstudio.adapters import NetworkUse, WeightPatcher, key_table, network_from_state_dict
from sdstudio.models.configs import preset
from sdstudio.models.stablediffusion import random_model


def kohya_default_lora(table, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """kohya's default LoRA targets: linears / 1x1 convs of the UNet transformers and the CLIP layers."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, target in table.targets.items():
        unet = (
            name.startswith("lora_unet_")
            and "_attentions_" in name
            and "_block" in name.split("_attentions_")[0]
        )
        text = name.startswith("lora_te_")
        if not (unet or text):
            continue
        out, fan_in = target.shape[0], target.shape[1]
        state[f"{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=gen, dtype=torch.float16)
        state[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen, dtype=torch.float16) * 0.01
        state[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep-originals", action="store_true", help="WeightPatcher(keep_originals=True)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    model = random_model(preset(args.arch), dtype=dtype)
    print(f"model built in {time.perf_counter() - started:.1f} s; torch threads {torch.get_num_threads()}")
    table = key_table(model)
    a, b = (network_from_state_dict(kohya_default_lora(table, args.rank, s), table, name=n)
            for s, n in ((1, "a"), (2, "b")))  # fmt: skip
    print(f"modules: {a.kinds}; unet {sum(m.target.part == 'unet' for m in a.modules)}, "
          f"te {sum(m.target.part == 'te' for m in a.modules)}")  # fmt: skip
    patcher = WeightPatcher(model, keep_originals=args.keep_originals)
    timings: dict[str, list[float]] = {"apply a (first)": [], "switch a -> b": [], "restore": []}
    for _ in range(args.repeats):
        for label, step in (
            ("apply a (first)", lambda: patcher.apply([NetworkUse(a, 1.0, 1.0)])),
            ("switch a -> b", lambda: patcher.apply([NetworkUse(b, 0.8, 1.0)])),
            ("restore", patcher.restore),
        ):
            t = time.perf_counter()
            step()
            timings[label].append(time.perf_counter() - t)
    for label, values in timings.items():
        print(
            f"{label:18s} median {statistics.median(values):.3f} s  (runs: {', '.join(f'{v:.3f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
