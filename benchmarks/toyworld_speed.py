"""Speed of the embedded toy model (issue 3: one 64x64 image, 20 steps, < 1 s; issue 6: < 1 s warm,
cold start < 3 s).

    python benchmarks/toyworld_speed.py [--model PATH] [--runs 5]

Warm: median over runs of one request (text encode + 20 Euler a steps with CFG 7 + VAE decode) in a
process that has already generated once. Cold: `sdstudio generate` as a fresh process, start to PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint (default: the embedded model)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from sdstudio.cli import embedded_model_path
    from sdstudio.engine import Pipeline
    from sdstudio.types import GenerationRequest

    model = args.model or embedded_model_path()
    t0 = time.perf_counter()
    pipe = Pipeline.from_file(model)
    load = time.perf_counter() - t0
    request = GenerationRequest(prompt="a red circle on a blue background", steps=args.steps, seed=1)
    pipe(request)  # warm-up
    times = []
    for i in range(args.runs):
        t = time.perf_counter()
        pipe(GenerationRequest(prompt="a large green square at the top left", steps=args.steps, seed=i))
        times.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        cold = []
        for i in range(3):
            out = Path(tmp) / f"{i}.png"
            cmd = [sys.executable, "-m", "sdstudio.cli", "generate", "a blue star", "-q", "-o", str(out)]
            if args.model:
                cmd += ["--model", args.model]
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            cold.append(time.perf_counter() - t)
    print(json.dumps({
        "model": str(model),
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "load_seconds": round(load, 3),
        "warm_seconds_per_image_median": round(statistics.median(times), 3),
        "warm_seconds_all": [round(t, 3) for t in times],
        "cold_start_seconds_median": round(statistics.median(cold), 3),
        "cold_all": [round(t, 3) for t in cold],
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
