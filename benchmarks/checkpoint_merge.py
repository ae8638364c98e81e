"""Peak memory of ``sdstudio checkpoint merge`` (weighted sum) on two random full-size checkpoints, against the
size of one of them. Not a timed test: the figure is how much of a model the merge holds at once.

    python benchmarks/checkpoint_merge.py                       # sd15, fp16, .safetensors inputs
    python benchmarks/checkpoint_merge.py --ckpt --in-memory    # also .ckpt inputs, and the load-everything way

Each merge runs in a fresh process that reports its peak resident size (``VmHWM``: every page it touched,
including file pages of memory-mapped inputs, which the kernel can reclaim) and the peak of its anonymous
memory (``RssAnon``, sampled every 5 ms: what it allocated), minus what the process held before the merge
(Python, torch, sdstudio). ``--in-memory`` measures the alternative this replaces: both files read whole
(``safetensors.torch.load_file``), the merged dict built, then ``save_file`` (A1111's ``run_modelmerger``).
The random files are written tensor by tensor, so making them needs little memory either.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIB = 1 << 20


def _status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) * 1024
    return out


class _AnonPeak:
    """The largest ``RssAnon`` seen by a thread polling /proc every 5 ms."""

    def __init__(self) -> None:
        self.peak = _status()["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status()["RssAnon"])

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status()["RssAnon"])


def write_random(path: Path, arch: str, dtype_name: str, seed: int) -> None:
    """A random checkpoint of ``arch`` (our keys and shapes), one tensor in memory at a time."""
    import torch

    from sdstudio.models.configs import PRESETS
    from sdstudio.models.diffusers_save import SafetensorsStream, TensorSpec
    from sdstudio.models.loading import parse_dtype
    from sdstudio.models.stablediffusion import StableDiffusion

    dtype = parse_dtype(dtype_name)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in StableDiffusion(PRESETS[arch]).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    with SafetensorsStream(path, {k: TensorSpec(s, dtype) for k, s in shapes.items()}) as stream:
        for key, shape in shapes.items():
            stream.put(key, (torch.randn(shape, generator=gen) * 0.02).to(dtype))


def _to_ckpt(source: Path, target: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(source)}, target)


def child(mode: str, a: str, b: str, out: str) -> None:
    """Run one merge in this (fresh) process and print its memory figures as JSON."""
    import torch  # noqa: F401  (imported before the baseline is taken)
    from safetensors.torch import load_file, save_file

    from sdstudio.models.merge import merge_checkpoints, weighted_sum_

    before = _status()
    sampler = _AnonPeak()
    start = time.perf_counter()
    if mode == "in-memory":
        ta, tb = load_file(a), load_file(b)
        save_file({k: weighted_sum_(ta[k].float(), tb[k].float(), 0.5).to(ta[k].dtype) for k in ta}, out)
    else:
        merge_checkpoints([a, b], out, alpha=0.5)
    seconds = time.perf_counter() - start
    anon_peak = sampler.stop()
    after = _status()
    print(
        json.dumps(
            {
                "seconds": round(seconds, 1),
                "baseline_rss_mib": round(before["VmRSS"] / MIB),
                "peak_rss_mib": round(after["VmHWM"] / MIB),
                "peak_rss_above_baseline_mib": round((after["VmHWM"] - before["VmRSS"]) / MIB),
                "peak_anon_above_baseline_mib": round((anon_peak - before["RssAnon"]) / MIB),
            }
        )
    )


def _measure(mode: str, a: Path, b: Path, out: Path) -> dict:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", mode, str(a), str(b), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--dir", help="where the random checkpoints go (default: a temporary folder)")
    parser.add_argument("--ckpt", action="store_true", help="also merge the same weights as .ckpt files")
    parser.add_argument("--in-memory", action="store_true", help="also measure load-everything-then-save")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "A", "B", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        a, b = root / "a.safetensors", root / "b.safetensors"
        for seed, path in enumerate((a, b)):
            write_random(path, args.arch, args.dtype, seed)
        size = a.stat().st_size
        results = {
            "arch": args.arch,
            "dtype": args.dtype,
            "one_model_mib": round(size / MIB),
            "streamed_safetensors": _measure("stream", a, b, root / "m.safetensors"),
        }
        if args.ckpt:
            ca, cb = root / "a.ckpt", root / "b.ckpt"
            _to_ckpt(a, ca)
            _to_ckpt(b, cb)
            results["streamed_ckpt_inputs"] = _measure("stream", ca, cb, root / "m2.safetensors")
        if args.in_memory:
            results["in_memory_safetensors"] = _measure("in-memory", a, b, root / "m3.safetensors")
    for figures in results.values():
        if isinstance(figures, dict):
            ratio = figures["peak_rss_above_baseline_mib"] / results["one_model_mib"]
            figures["peak_above_baseline_per_model"] = round(ratio, 2)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
