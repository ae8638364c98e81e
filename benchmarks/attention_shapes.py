"""The attention policy per shape (issue 6): the sliced CPU path against PyTorch's fused kernel, call by
call, on the shapes Stable Diffusion runs, in bf16.

    python benchmarks/attention_shapes.py             # all shapes, 5 rounds
    python benchmarks/attention_shapes.py --runs 3 --quick

``sdstudio.models.attention.prefer_sliced`` slices long bf16 heads on CPUs without AMX and hands every
shape to the fused kernel on CPUs with AMX; this prints, for each shape, the median milliseconds of both
(taking turns, after a warm-up), their ratio, and what the policy picks on this machine. Inputs are the
transposed [batch, heads, tokens, head_dim] views the UNet passes. Freed memory is kept in the heap, as
``sdstudio generate`` runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.levers import _interleaved_medians

# (batch, heads, queries, keys, head width, what it is)
SHAPES = [
    (2, 8, 4096, 4096, 40, "sd15 512x512, 64x64 self-attention, CFG batch"),
    (2, 8, 4096, 77, 40, "sd15 512x512, 64x64 cross-attention"),
    (2, 8, 1024, 1024, 80, "sd15 512x512, 32x32 self-attention"),
    (2, 8, 256, 256, 160, "sd15 512x512, 16x16 self-attention"),
    (2, 8, 1024, 1024, 40, "sd15 256x256, 32x32 self-attention"),
    (2, 8, 512, 512, 40, "sd15 at 184x184 (sliced threshold)"),
    (2, 5, 4096, 4096, 64, "sd2 768x768 heads of 64 at 64x64"),
    (1, 1, 4096, 4096, 512, "VAE mid-block at 512x512"),
    (2, 8, 16384, 16384, 40, "sd15 1024x1024, 128x128 self-attention"),
    (1, 1, 16384, 16384, 512, "VAE mid-block at 1024x1024"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="skip the 1024x1024 shapes")
    args = parser.parse_args(argv)

    from sdstudio.cpu import has_amx
    from sdstudio.host_memory import keep_freed_memory
    from sdstudio.models.attention import _sliced_attention, prefer_sliced

    keep_freed_memory()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b, h, n, m, d, what in SHAPES:
        if args.quick and max(n, m) > 4096:
            continue
        qkv = [torch.randn(b, t, h, d, generator=gen).to(torch.bfloat16).transpose(1, 2) for t in (n, m, m)]
        ms = _interleaved_medians(
            {"sliced": partial(_sliced_attention, *qkv), "fused": partial(F.scaled_dot_product_attention, *qkv)},
            args.runs,
        )
        rows.append({
            "shape": [b, h, n, m, d], "what": what,
            "sliced_ms": round(ms["sliced"] * 1e3, 2), "fused_ms": round(ms["fused"] * 1e3, 2),
            "sliced_over_fused": round(ms["sliced"] / ms["fused"], 2),
            "policy_on_this_machine": "sliced" if prefer_sliced(*qkv) else "fused",
        })  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"amx": has_amx(), "torch_threads": torch.get_num_threads(), "calls": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
