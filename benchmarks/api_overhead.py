"""What `sdstudio serve` adds per image over the Python API, and its throughput with concurrent clients.

A: POST /sdapi/v1/txt2img to a real uvicorn server on 127.0.0.1 (HTTP + JSON + SQLite queue + worker + PNG
   file + base64), the client decoding the base64 image; B: ``Pipeline(request)`` for the same request, on
   the same loaded pipeline in the same process (so the same torch thread count). A and B are interleaved
   (ABBA...) so that load from other processes hits both alike; medians of ``--runs`` each.
Throughput: ``--jobs`` images by one client one after another, and by ``--clients`` clients at once (the
clients are threads of this process), alternated for ``--rounds`` rounds; medians.

    .venv/bin/python benchmarks/api_overhead.py --steps 20 --size 64 --runs 15 --threads 1
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("benchmarks.api_overhead")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alternated(
    first: Callable[[], float], second: Callable[[], float], n: int
) -> tuple[list[float], list[float]]:
    """``n`` measurements of each, in ABBA order, so that a change in the machine's load hits both alike."""
    a: list[float] = []
    b: list[float] = []
    for i in range(n):
        if i % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=15, help="A/B pairs for the overhead")
    parser.add_argument("--jobs", type=int, default=16, help="images in each throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (median of them)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="the server's --workers")
    parser.add_argument("--threads", type=int, help="torch threads (default: sdstudio's thread policy)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from sdstudio.threads import apply_thread_policy

    threads = apply_thread_policy(args.threads)  # before torch starts its pools

    import httpx
    import uvicorn

    from sdstudio.cli import embedded_model_path
    from sdstudio.engine import Pipeline
    from sdstudio.server.a1111 import ServerLimits
    from sdstudio.server.app import ServerConfig, create_app
    from sdstudio.types import GenerationRequest

    model = embedded_model_path()
    pipeline = Pipeline.from_file(model)

    def load(path: Path, vae: Path | None = None) -> Pipeline:
        # one worker runs the benchmark's own pipeline (B runs it only while A waits); more get their own
        return pipeline if args.workers == 1 else Pipeline.from_file(path, vae=vae)

    payload = {"prompt": "a red ball on the left", "seed": 1, "steps": args.steps, "width": args.size,
               "height": args.size, "sampler_name": "Euler", "cfg_scale": 7.0}  # fmt: skip
    request = GenerationRequest(prompt=payload["prompt"], seed=1, steps=args.steps, width=args.size,
                                height=args.size, sampler="Euler", cfg_scale=7.0)  # fmt: skip

    with tempfile.TemporaryDirectory() as data_dir:
        config = ServerConfig(model=model, data_dir=Path(data_dir), workers=args.workers,
                              limits=ServerLimits(max_size=max(256, args.size), default_size=None))  # fmt: skip
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(config, load), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
        try:
            with httpx.Client(timeout=600) as client:

                def api(seed: int = 1) -> float:
                    t = time.perf_counter()
                    r = client.post(url, json={**payload, "seed": seed})
                    r.raise_for_status()
                    base64.b64decode(r.json()["images"][0])
                    return time.perf_counter() - t

                def direct() -> float:
                    t = time.perf_counter()
                    pipeline(request)
                    return time.perf_counter() - t

                api(), direct()  # warm-up: first calls pay one-time costs
                a, b = alternated(api, direct, args.runs)

            def one_client(seeds: list[int]) -> None:
                with httpx.Client(timeout=600) as c:
                    for seed in seeds:
                        c.post(url, json={**payload, "seed": seed}).raise_for_status()

            def sequential() -> float:
                t = time.perf_counter()
                one_client(list(range(100, 100 + args.jobs)))
                return args.jobs / (time.perf_counter() - t)

            def concurrent() -> float:
                shares = [list(range(200 + i, 200 + args.jobs, args.clients)) for i in range(args.clients)]
                t = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    for f in [pool.submit(one_client, s) for s in shares]:
                        f.result()
                return args.jobs / (time.perf_counter() - t)

            seq_rates, conc_rates = alternated(sequential, concurrent, args.rounds)
        finally:
            server.should_exit = True
            thread.join(60)

    med_a, med_b = statistics.median(a), statistics.median(b)
    ratios = sorted(x / y for x, y in zip(a, b))
    figures = {
        "steps": args.steps, "size": args.size, "runs": args.runs, "threads": threads.threads,
        "workers": args.workers, "load_average": os.getloadavg(),
        "api_median_s": med_a, "python_median_s": med_b,
        "overhead_s": med_a - med_b, "overhead_pct": 100 * (med_a / med_b - 1),
        "pair_ratio_median": statistics.median(ratios),
        "sequential_images_per_s": statistics.median(seq_rates),
        "concurrent_images_per_s": statistics.median(conc_rates), "clients": args.clients, "jobs": args.jobs,
        "rounds": args.rounds,
    }  # fmt: skip
    rows = [
        ("Python API Pipeline(request), median", f"{med_b * 1000:.1f} ms"),
        ("HTTP /sdapi/v1/txt2img, median", f"{med_a * 1000:.1f} ms"),
        ("overhead per image", f"{(med_a - med_b) * 1000:.1f} ms ({figures['overhead_pct']:+.1f} %)"),
        ("median of paired API/Python ratios", f"{figures['pair_ratio_median']:.3f}"),
        ("throughput, 1 client sequential (median)", f"{figures['sequential_images_per_s']:.2f} images/s"),
        (
            f"throughput, {args.clients} concurrent clients (median)",
            f"{figures['concurrent_images_per_s']:.2f} images/s",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    out = sys.stdout
    out.write(f"{args.size}x{args.size}, {args.steps} steps, Euler, {threads.threads} torch threads, "
              f"{args.workers} worker(s), {args.runs} A/B pairs; load average {figures['load_average']}\n")  # fmt: skip
    for name, value in rows:
        out.write(f"  {name:<{width}}  {value}\n")
    out.write(json.dumps(figures) + "\n")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
