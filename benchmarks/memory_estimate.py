"""The memory estimate (``sdstudio.pipelines.memory``) against the measured peak of ``sdstudio generate``.

Each case runs the real command in a fresh process, with ``-v`` so that it logs its estimate: what the
request needs beyond what the process holds, and the process's resident memory at the check. While it
runs, this script watches the process: when the estimate is logged (after the model has loaded, before
any sampling) it resets the process's peak resident memory (``/proc/PID/clear_refs``, 5) and then reads
``VmHWM`` until the process ends. So the request's peak is measured apart from the load's (which, from a
checkpoint in another dtype, maps the file beside the converted copy); ``ru_maxrss`` of the whole process
is printed too.

Peak memory does not depend on the step count (every step allocates the same; where the heap keeps
freed memory it settles after 3-4 steps, +10 MiB after the second at 512x512: ``--phases --steps 8``), so
two steps are enough.

Three more measurements back the estimate's constants, each in fresh processes:

- ``--parts``: the live peak of one UNet call, VAE decode and encode (large blocks handed back to the
  system when freed, so resident memory follows the live tensors) against the layer-by-layer count;
- ``--phases``: a whole request in one process, resident memory after sampling and after the decode,
  with freed memory handed back and kept in the heap (as ``sdstudio generate`` does): how much more the
  kept heap grows than the live tensors (``KEPT_HEAP_*``) and what the first request's libraries add
  (``RUNTIME``);
- ``--attention``: bytes per score of PyTorch's math attention path (``MATH_BYTES_PER_SCORE``).

    python benchmarks/memory_estimate.py                     # sd15 fp16 file at 256/512/768, embedded model
    python benchmarks/memory_estimate.py --sizes 512 --file-dtype fp32 --no-embedded
    python benchmarks/memory_estimate.py --parts
    python benchmarks/memory_estimate.py --phases --sizes 512 768
    python benchmarks/memory_estimate.py --attention
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

MiB = 2**20
ESTIMATE = re.compile(
    r"memory: the request needs (\d+) MiB more \((.*)\); the process holds (\d+) MiB, so it peaks at about "
    r"(\d+) MiB; (\w+)(?: MiB)? available"
)


@dataclass
class Case:
    name: str
    args: list[str]


@dataclass
class Result:
    case: str
    estimated_peak_mib: int  # what the process holds at the check + what the request needs
    measured_peak_mib: float  # VmHWM from the check to the end
    ratio: float  # estimated / measured
    needed_mib: int  # the estimate's part: what the request adds
    measured_increase_mib: float  # VmHWM - VmRSS at the check
    increase_ratio: float
    process_max_rss_mib: float  # ru_maxrss: the whole process, its load included
    parts: str
    seconds: float


def _status(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def sdstudio_command() -> list[str]:
    """The installed ``sdstudio`` command beside this Python, else the module (same entry point)."""
    script = Path(sys.executable).with_name("sdstudio")
    return (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import sys; from sdstudio.cli import entry; sys.exit(entry())"]
    )


def run_case(case: Case, poll: float = 0.005) -> Result:
    cmd = [*sdstudio_command(), "-v", "generate", *case.args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state: dict[str, object] = {}
    lines: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        buffer = ""
        while chunk := proc.stderr.read(1):
            buffer += chunk
            if chunk in "\r\n":
                lines.append(buffer)
                found = ESTIMATE.search(buffer)
                if found and "reset" not in state:
                    with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
                        f.write("5")  # peak RSS := RSS now
                    state["reset"] = _status(proc.pid, "VmRSS")
                    state["estimate"] = found
                buffer = ""
        lines.append(buffer)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    hwm = 0
    while True:  # reaped here, not by Popen, to get the child's own rusage
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        if "reset" in state:
            hwm = max(hwm, _status(proc.pid, "VmHWM") or 0)
        time.sleep(poll)
    reader.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or "estimate" not in state:
        raise SystemExit(f"{case.name}: sdstudio failed ({proc.returncode}):\n{''.join(lines)[-3000:]}")
    found = state["estimate"]
    assert isinstance(found, re.Match)
    needed, parts, peak = int(found[1]), found[2], int(found[4])
    rss_at_check = state["reset"]
    assert isinstance(rss_at_check, int)
    max_rss = usage.ru_maxrss * 1024
    increase = (hwm - rss_at_check) / MiB
    return Result(
        case=case.name,
        estimated_peak_mib=peak,
        measured_peak_mib=round(hwm / MiB, 1),
        ratio=round(peak / (hwm / MiB), 3),
        needed_mib=needed,
        measured_increase_mib=round(increase, 1),
        increase_ratio=round(needed / increase, 3) if increase > 0 else float("nan"),
        process_max_rss_mib=round(max_rss / MiB, 1),
        parts=parts,
        seconds=round(seconds, 1),
    )


# ---------------------------------------------------------------------------------------------------
# Children: one measurement each, in a fresh process


def _heap(mode: str) -> None:
    """``live``: blocks above 64 KiB mapped apart and handed back when freed (resident memory follows the
    live tensors); ``kept``: freed memory kept in the heap, as ``sdstudio generate`` runs."""
    import ctypes

    if mode == "live":
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD, fixed
    else:
        from sdstudio.host_memory import keep_freed_memory

        keep_freed_memory()


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status(os.getpid(), "VmRSS") or 0


def child_part(arch: str, dtype_name: str, part: str, latent: int, batch: int) -> dict:
    _heap("live")
    import torch

    from sdstudio.engine import prefer_channels_last
    from sdstudio.models.configs import preset
    from sdstudio.models.unet import UNetModel
    from sdstudio.models.vae import AutoencoderKL
    from sdstudio.pipelines import memory
    from sdstudio.pipelines.vae_tiling import decode, encode_mean

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    config = preset(arch)
    unet = part == "unet"
    with torch.device("meta"):
        net = UNetModel(config.unet) if unet else AutoencoderKL(config.vae)
    net = net.to_empty(device="cpu").to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    channels_last = prefer_channels_last(dtype)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    policy = memory._Policy("cpu", dtype, channels_last, torch.get_num_threads())
    f = config.vae.downsample
    tiled = part.endswith("tiled")
    with torch.inference_mode():
        if unet:
            x = torch.randn(batch, config.unet.in_channels, latent, latent).to(dtype)
            t, c = torch.full((batch,), 500.0), torch.randn(batch, 77, config.unet.context_dim)
            run = lambda: net(x, t, c)
            fused = dtype == torch.bfloat16  # packed GEGLU
            model = memory.unet_activations(config.unet, batch, latent, latent, policy, fused)
        elif part.startswith("decode"):
            z = torch.randn(batch, config.vae.z_channels, latent, latent)
            run = lambda: decode(net, z, tiled)
            model = memory.decode_bytes(config.vae, batch, latent, latent, policy, tiled) - 2 * z.nbytes
        else:
            image = torch.randn(batch, 3, latent * f, latent * f)
            run = lambda: encode_mean(net, image, tiled)
            model = (
                memory.encode_bytes(config.vae, batch, latent * f, latent * f, policy, tiled) - image.nbytes
            )
        run()  # warm: oneDNN's kernels, the UNet's packed weights
        before = _reset_peak()
        run()
        measured = (_status(os.getpid(), "VmHWM") or 0) - before
    return {
        "part": f"{arch} {dtype_name} {part} {latent}x{latent} latents, batch {batch}",
        "measured": measured,
        "model": model,
    }


def child_phases(path: str, size: int, batch: int, heap: str, precision: str, steps: int) -> dict:
    _heap(heap)
    from sdstudio.engine import Pipeline, choose_dtype
    from sdstudio.pipelines import memory
    from sdstudio.pipelines.sampling import plan
    from sdstudio.types import GenerationRequest

    pipeline = Pipeline.from_file(path, dtype=choose_dtype(precision))
    request = GenerationRequest("a photo", seed=1, steps=steps, width=size, height=size, batch_size=batch)
    p = plan(pipeline.model, request)
    live = memory.estimate(pipeline.model, p, request, None, kept_heap=False)
    before = _reset_peak()
    sampled: list[int] = []
    pipeline(request, callback=lambda step: sampled.append((_status(os.getpid(), "VmHWM") or 0) - before))
    end = (_status(os.getpid(), "VmHWM") or 0) - before
    return {
        "steps": sampled,
        "end": end,
        "packed": live.packed,
        "unet": live.unet,
        "vae": live.vae,
    }


def child_attention() -> list[dict]:
    _heap("live")
    import torch
    import torch.nn.functional as F

    rows = []
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for tokens in (4096, 16384):
                x = torch.randn(1, 512, tokens, dtype=dtype)
                q = x[:, None].transpose(2, 3)  # [1, 1, tokens, 512], last dimension strided: the math path
                F.scaled_dot_product_attention(q[..., :64, :], q[..., :64, :], q[..., :64, :])
                before = _reset_peak()
                out = F.scaled_dot_product_attention(q, q, q)
                peak = (_status(os.getpid(), "VmHWM") or 0) - before - out.nbytes
                rows.append({"dtype": str(dtype), "tokens": tokens, "bytes_per_score": peak / tokens**2})
    return rows


def _child(args: list[str]) -> None:
    kind, *rest = args
    if kind == "part":
        arch, dtype, part, latent, batch = rest
        result: object = child_part(arch, dtype, part, int(latent), int(batch))
    elif kind == "phases":
        path, size, batch, heap, precision, steps = rest
        result = child_phases(path, int(size), int(batch), heap, precision, int(steps))
    else:
        result = child_attention()
    print(json.dumps(result))


def _run_child(*args: object) -> object:
    cmd = [sys.executable, __file__, "--child", *map(str, args)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


PARTS = [
    ("sd15", "bf16", "unet", 64, 2),
    ("sd15", "bf16", "unet", 96, 2),
    ("sd15", "bf16", "decode", 64, 1),
    ("sd15", "bf16", "decode", 96, 1),
    ("sd15", "bf16", "decode-tiled", 128, 1),
    ("sd15", "bf16", "encode", 64, 1),
    ("sd15", "fp32", "unet", 64, 2),
    ("sd15", "fp32", "decode", 64, 1),
    ("sd15", "fp32", "encode", 64, 1),
    ("toyworld", "fp32", "unet", 64, 2),
    ("toyworld", "fp32", "decode", 64, 1),
    ("toyworld", "bf16", "decode", 64, 1),
]


def run_parts() -> None:
    print("| network, pass | measured live peak MiB | counted MiB | counted / measured |")
    print("| --- | --- | --- | --- |")
    for spec in PARTS:
        r = _run_child("part", *spec)
        assert isinstance(r, dict)
        m, c = r["measured"] / MiB, r["model"] / MiB
        print(f"| {r['part']} | {m:.1f} | {c:.1f} | {c / m:.3f} |", flush=True)


def run_phases(model: Path, sizes: list[int], batch: int, precision: str, steps: int) -> None:
    print(
        "| size, batch | heap | after sampling MiB (per step) | after the decode MiB | UNet growth / live "
        "| decode growth / live |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for size in sizes:
        live = _run_child("phases", model, size, batch, "live", precision, steps)
        kept = _run_child("phases", model, size, batch, "kept", precision, steps)
        assert isinstance(live, dict) and isinstance(kept, dict)
        # live: the sampling's peak is the packed weights, the runtime and the UNet's live activations
        runtime = max(live["steps"]) - live["packed"] - live["unet"]
        for name, r in (("handed back", live), ("kept", kept)):
            sampled = max(r["steps"])
            unet = (sampled - r["packed"] - runtime) / r["unet"]
            vae = (
                (r["end"] - sampled) / r["vae"]
                if name == "kept"
                else (r["end"] - sampled + r["unet"]) / r["vae"]
            )
            per_step = ", ".join(f"{v / MiB:.0f}" for v in r["steps"])
            print(
                f"| {size}x{size}, {batch} | {name} | {sampled / MiB:.0f} ({per_step}) | {r['end'] / MiB:.0f} | "
                f"{unet:.2f} | {vae:.2f} |",
                flush=True,
            )
        print(f"(runtime on first use: {runtime / MiB:.0f} MiB)", flush=True)


def random_checkpoint(folder: Path, arch: str, dtype: str) -> Path:
    path = folder / f"{arch}-{dtype}.safetensors"
    cmd = [sys.executable, "-m", "sdstudio.cli", "checkpoint", "random", "--arch", arch, "--dtype", dtype]
    subprocess.run([*cmd, "-o", str(path)], check=True, stdout=subprocess.DEVNULL)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sd15")
    ap.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 768])
    ap.add_argument("--file-dtype", action="append", choices=["fp16", "fp32", "bf16"], help="default: fp16")
    ap.add_argument("--steps", type=int, default=2, help="peak memory does not depend on it")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--no-embedded", action="store_true", help="skip the embedded model's cases")
    ap.add_argument("--extra", default="", help='more arguments for every sd15 case, e.g. "--precision fp32"')
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--parts", action="store_true", help="live peaks of single passes against the count")
    ap.add_argument(
        "--phases", action="store_true", help="heap growth per phase, freed memory handed back or kept"
    )
    ap.add_argument("--precision", default="auto", help="for --phases")
    ap.add_argument("--attention", action="store_true", help="bytes per score of the math attention path")
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
        return
    args = ap.parse_args()
    from sdstudio.pipelines.memory import available_bytes

    if args.parts:
        run_parts()
        return
    if args.attention:
        for row in _run_child("attention"):  # type: ignore[union-attr]
            print(row)
        return
    if args.phases:
        with tempfile.TemporaryDirectory(prefix="memory-estimate-") as tmp:
            model = random_checkpoint(Path(tmp), args.arch, (args.file_dtype or ["fp16"])[0])
            run_phases(model, args.sizes, args.batch, args.precision, args.steps)
        return

    cases: list[Case] = []
    common = ["--steps", str(args.steps), "--seed", "1", "--batch", str(args.batch), "--overwrite"]
    with tempfile.TemporaryDirectory(prefix="memory-estimate-") as tmp:
        folder = Path(tmp)
        out = ["-o", str(folder / "out.png")]
        if not args.no_embedded:
            cases.append(Case("embedded 64x64, 20 steps", ["a red ball", *out, "--overwrite"]))
            cases.append(
                Case("embedded 64x64 + hires 2x", ["a red ball", "--hires-scale", "2", *out, "--overwrite"])
            )
        for dtype in args.file_dtype or ["fp16"]:
            if not args.sizes:
                break
            model = random_checkpoint(folder, args.arch, dtype)
            for size in args.sizes:
                size_args = ["--width", str(size), "--height", str(size)]
                name = f"{args.arch} {dtype} file, {size}x{size}, batch {args.batch}"
                extra = shlex.split(args.extra)
                name += f" {args.extra}" if extra else ""
                cases.append(
                    Case(name, ["a photo", "--model", str(model), *size_args, *common, *extra, *out])
                )
        results = []
        for _ in range(args.runs):
            for case in cases:
                free = available_bytes()
                print(
                    f"{case.name}: running ({(free or 0) / 2**30:.1f} GiB available)",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(run_case(case))
    print(
        "| case | estimated peak MiB | measured peak MiB | ratio | estimated increase MiB | measured increase "
        "MiB | ratio | process ru_maxrss MiB | s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.case} | {r.estimated_peak_mib} | {r.measured_peak_mib} | {r.ratio} | {r.needed_mib} | "
            f"{r.measured_increase_mib} | {r.increase_ratio} | {r.process_max_rss_mib} | {r.seconds} |"
        )
    for r in results:
        print(f"{r.case}: {r.parts}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
