"""Is bf16 fast on this CPU? Times fp32 against bf16 for a matmul, a conv and a training step.

    python benchmarks/precision.py

On CPUs with native bf16 (AVX-512 BF16, AMX) bf16 should win; on AVX2-only CPUs PyTorch falls back to
scalar bf16 code, which is what `sdstudio.engine.choose_dtype("auto")` avoids.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable

import torch

from sdstudio.cpu import cpu_flags
from sdstudio.engine import choose_dtype


def timed(fn: Callable[[], object], runs: int = 2) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t) / runs


def main() -> None:
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    ab, bb = a.bfloat16(), b.bfloat16()
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(8, 64, 64, 64)
    conv_b, x_b = torch.nn.Conv2d(64, 64, 3, padding=1).bfloat16(), x.bfloat16()
    lin = torch.nn.Linear(1024, 1024)
    rows = torch.randn(2048, 1024, requires_grad=True)

    def train_step(ctx: contextlib.AbstractContextManager) -> None:
        with ctx:
            y = lin(rows)
        y.float().sum().backward()

    with torch.no_grad():
        mm32, mm16 = timed(lambda: a @ b), timed(lambda: ab @ bb)
        cv32, cv16 = timed(lambda: conv(x)), timed(lambda: conv_b(x_b))
    tr32 = timed(lambda: train_step(contextlib.nullcontext()))
    tr16 = timed(lambda: train_step(torch.autocast("cpu", dtype=torch.bfloat16)))
    flags = cpu_flags()
    print(json.dumps({
        "threads": torch.get_num_threads(),
        "native_bf16_flags": sorted({"avx512_bf16", "amx_bf16", "amx_tile"} & flags),
        "avx512f": "avx512f" in flags,
        "auto_precision": str(choose_dtype("auto")),
        f"matmul_{n}_fp32_s": round(mm32, 4), f"matmul_{n}_bf16_s": round(mm16, 4),
        "matmul_fp32_gflops": round(2 * n**3 / mm32 / 1e9, 1), "matmul_bf16_gflops": round(2 * n**3 / mm16 / 1e9, 2),
        "conv64_fwd_fp32_s": round(cv32, 4), "conv64_fwd_bf16_s": round(cv16, 4),
        "linear_train_fp32_s": round(tr32, 4), "linear_train_bf16_autocast_s": round(tr16, 4),
    }, indent=2))


if __name__ == "__main__":
    main()
