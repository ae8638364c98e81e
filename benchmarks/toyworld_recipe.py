"""Time the toyworld recipe (issue 3: whole recipe <= 60 min on the 2-core CPU).

    python benchmarks/toyworld_recipe.py --out runs/toyworld         # run (or resume) it, then report
    python benchmarks/toyworld_recipe.py --summarize runs/toyworld   # report an existing run

Stage times come from each stage's log.jsonl (training seconds as the trainer measured them) and the
run log's timestamps; the report says whether the run was resumed, since then the sum understates it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def summarize(out: Path) -> dict:
    stages = {}
    for stage in ("vae", "text", "unet"):
        log = out / stage / "log.jsonl"
        if log.exists():
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            stages[stage] = {
                "steps": lines[-1]["step"],
                "train_seconds": lines[-1]["seconds"],
                "first_loss": lines[0]["loss"],
                "last_smoothed_loss": lines[-1]["smoothed"],
                "log_lines": len(lines),
            }
    files = {p.name: p.stat().st_mtime for p in out.iterdir() if p.is_file()}
    wall = max(files.values()) - (out / "recipe.json").stat().st_mtime if files else None
    final = out / "toyworld.safetensors"
    return {
        "run": str(out),
        "stages": stages,
        "wall_seconds_recipe_json_to_last_file": round(wall, 1) if wall else None,
        "final_checkpoint_bytes": final.stat().st_size if final.exists() else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="run the recipe into this folder (resumes a run of the same recipe)")
    group.add_argument("--summarize", help="only report an existing run folder")
    args = parser.parse_args()
    if args.out:
        from sdstudio.toyworld.recipe import run_recipe

        t0 = time.perf_counter()
        run_recipe(args.out)
        print(f"recipe wall time this invocation: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(json.dumps(summarize(Path(args.out or args.summarize)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
