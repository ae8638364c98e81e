"""Batch generation from a JSON-lines file: one AUTOMATIC1111 txt2img payload per line, generated into a
folder that a rerun resumes, in this process or over Ray actors.

Every line is translated and checked before any model loads (:func:`parse_batch`): one bad line refuses
the whole file, and the error names each bad line. Line ``N``'s images are written atomically as
``NNNNN-KK.png`` (``KK``: the image's index over the line's ``n_iter`` x ``batch_size`` images, with the
same infotext ``generate`` writes), then one entry is appended to ``manifest.jsonl``: the line number,
the hash of the line's request, its files, seeds and seconds. A rerun skips the lines whose latest entry
has the line's hash and whose files exist, so a killed run finishes the rest, and a changed line (a new
hash) is generated again. Only the driver writes files, also under Ray, where each actor loads the model
once and sends back the images of a line.

The hash is of the line's JSON with its keys sorted: reordering keys or spacing changes nothing; the
model and the folders of networks are not part of it (use another ``--outdir`` for another model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdstudio.errors import SdStudioError
from sdstudio.io.images import save_png
from sdstudio.pipelines.validate import DEFAULT_LIMITS, Limits, check_request
from sdstudio.server.a1111 import IMG2IMG_DEFAULTS, TXT2IMG_DEFAULTS, ServerLimits, to_request, with_defaults
from sdstudio.types import GeneratedImage, GenerationRequest

if TYPE_CHECKING:
    from sdstudio.engine import Pipeline

__all__ = [
    "MANIFEST_NAME",
    "BatchLine",
    "BatchReport",
    "LineFailure",
    "LineOutput",
    "LineWorker",
    "ManifestEntry",
    "PipelineSpec",
    "RayOptions",
    "append_manifest",
    "cpu_worker_threads",
    "file_names",
    "generate_line",
    "import_ray",
    "parse_batch",
    "parse_line",
    "pending_lines",
    "read_batch",
    "read_manifest",
    "repair_manifest",
    "request_hash",
    "run_batch",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
RAY_INSTALL = "pip install 'sdstudio[ray]'"
MAX_LISTED_ERRORS = 20  # a file of thousands of bad lines gets the first ones and a count
# the override_settings to_request uses; others (sd_model_checkpoint, ...) are ignored, with a warning
OVERRIDE_SETTINGS = ("CLIP_stop_at_last_layers", "eta_noise_seed_delta")
IMG2IMG_FIELDS = tuple(sorted(set(IMG2IMG_DEFAULTS) - set(TXT2IMG_DEFAULTS)))
_OUTPUT_NAME = re.compile(r"(\d{5,})-(\d{2,})\.png")


class LineError(ValueError):
    """A line the batch refuses; its message names the field and the problem (the caller adds the line)."""


@dataclass(frozen=True)
class BatchLine:
    """One request line: its number in the file (from 1, as editors count), its hash, and its translation.

    ``request`` carries the payload's seed; :meth:`requests` resolves ``-1`` (drawing from ``rng``) and
    gives one request per ``n_iter`` iteration, seeds ``seed + k * batch_size`` as AUTOMATIC1111 numbers
    them."""

    number: int
    digest: str
    request: GenerationRequest
    n_iter: int = 1

    @property
    def image_count(self) -> int:
        return self.n_iter * self.request.batch_size

    def requests(self, rng: random.Random) -> tuple[GenerationRequest, ...]:
        # a drawn seed leaves room for the line's last image's seed, at most MAX_SEED (2**32 - 1)
        seed = self.request.seed if self.request.seed != -1 else rng.randrange(2**32 - self.image_count + 1)
        step = self.request.batch_size
        return tuple(dataclasses.replace(self.request, seed=seed + k * step) for k in range(self.n_iter))


def request_hash(payload: Mapping[str, Any]) -> str:
    """The hash a manifest entry records: of the payload as JSON with sorted keys, so that key order and
    spacing do not count."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_names(number: int, count: int) -> tuple[str, ...]:
    return tuple(f"{number:05d}-{k:02d}.png" for k in range(count))


def _ignored_fields(payload: Mapping[str, Any]) -> list[str]:
    ignored = sorted(k for k in payload if k not in TXT2IMG_DEFAULTS)
    overrides = payload.get("override_settings")
    if isinstance(overrides, dict):
        ignored += sorted(f"override_settings.{k}" for k in overrides if k not in OVERRIDE_SETTINGS)
    return ignored


def parse_line(
    number: int, text: str, limits: ServerLimits, caps: Limits = DEFAULT_LIMITS
) -> tuple[BatchLine, list[str]]:
    """One line (not blank, not a comment) -> the line and the payload fields it ignores; ``LineError`` if it
    is not a txt2img payload that :func:`sdstudio.server.a1111.to_request` translates and
    :func:`check_request` accepts (model-independent checks: the model's own size is checked when it runs)."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(payload, dict):
        raise LineError('expected a JSON object of txt2img fields, such as {"prompt": "a cat", "seed": 1}')
    img2img = [k for k in IMG2IMG_FIELDS if payload.get(k)]
    if img2img:
        raise LineError(
            f"{', '.join(img2img)}: img2img fields are not supported; a batch line is a txt2img request"
        )
    try:
        request = to_request("txt2img", payload, limits)
        n_iter = with_defaults("txt2img", payload)["n_iter"]
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise LineError(f"n_iter: expected an integer of at least 1 (got {n_iter!r})")
        last_seed = request.seed if request.seed == -1 else request.seed + (n_iter - 1) * request.batch_size
        check_request(request, caps)
        check_request(dataclasses.replace(request, seed=last_seed), caps)  # the last iteration's seed too
    except (SdStudioError, TypeError, ValueError) as e:  # FieldError and LineError are ValueErrors
        raise LineError(str(e)) from None
    return BatchLine(number, request_hash(payload), request, n_iter), _ignored_fields(payload)


def parse_batch(
    text: str, source: str, limits: ServerLimits, caps: Limits = DEFAULT_LIMITS
) -> tuple[BatchLine, ...]:
    """Every request line of a batch file; blank lines and lines starting with ``#`` are skipped.

    Refuses the whole file (``SdStudioError`` naming each bad line) if any line is bad, so that nothing is
    generated from a file with a typo in it; fields A1111's txt2img does not know are logged and ignored,
    as A1111 ignores them."""
    lines: list[BatchLine] = []
    errors: list[str] = []
    # not str.splitlines(): it also splits at U+2028 and friends, which JSON strings may hold unescaped
    for number, raw in enumerate(text.split("\n"), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            line, ignored = parse_line(number, stripped, limits, caps)
        except LineError as e:
            errors.append(f"line {number}: {e}")
            continue
        if ignored:
            log.warning(
                "%s line %d: ignored fields txt2img does not use: %s", source, number, ", ".join(ignored)
            )
        lines.append(line)
    if errors:
        listed = errors[:MAX_LISTED_ERRORS]
        if len(errors) > len(listed):
            listed.append(f"and {len(errors) - len(listed)} more")
        bad = "1 bad line" if len(errors) == 1 else f"{len(errors)} bad lines"
        raise SdStudioError(f"{source}: {bad}, nothing generated: " + "; ".join(listed))
    if not lines:
        raise SdStudioError(f"{source}: no requests (every line is blank or a # comment)")
    return tuple(lines)


def read_batch(
    path: str | os.PathLike, limits: ServerLimits, caps: Limits = DEFAULT_LIMITS
) -> tuple[BatchLine, ...]:
    """:func:`parse_batch` of a UTF-8 file (a byte-order mark is allowed)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SdStudioError(f"{path}: no such batch file") from None
    except IsADirectoryError:
        raise SdStudioError(f"{path}: is a folder; give a .jsonl file of requests") from None
    except UnicodeDecodeError as e:
        raise SdStudioError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_batch(text, str(path), limits, caps)


# ---- the manifest


@dataclass(frozen=True)
class ManifestEntry:
    """One finished line, as ``manifest.jsonl`` records it."""

    line: int
    digest: str
    files: tuple[str, ...]
    seeds: tuple[int, ...]
    seconds: float
    warnings: tuple[str, ...] = ()
    worker: str = ""  # host:pid that generated the line

    def to_json(self) -> str:
        return json.dumps({
            "line": self.line, "hash": self.digest, "files": list(self.files),
            "seed": self.seeds[0] if self.seeds else None, "seeds": list(self.seeds),
            "seconds": round(self.seconds, 3), "warnings": list(self.warnings), "worker": self.worker,
        }, ensure_ascii=False)  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> ManifestEntry:
        """``ValueError`` if ``data`` is not an entry :meth:`to_json` writes."""
        try:
            entry = cls(
                line=data["line"], digest=data["hash"], files=tuple(data["files"]),
                seeds=tuple(data["seeds"]),
                seconds=float(data["seconds"]), warnings=tuple(data.get("warnings", ())),
                worker=str(data.get("worker", "")),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a manifest entry ({type(e).__name__}: {e})") from None
        if not isinstance(entry.line, int) or not all(isinstance(f, str) for f in entry.files):
            raise ValueError("not a manifest entry (line or files of the wrong type)")
        return entry


def repair_manifest(path: Path) -> None:
    """Cut a last line left unfinished by a killed run, so that the next entry starts on a line of its own."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning(
            "%s: dropping an unfinished last entry (%d bytes) left by an interrupted run",
            path,
            len(data) - keep,
        )
        f.truncate(keep)


def read_manifest(path: Path) -> dict[int, ManifestEntry]:
    """The latest entry of each line number; unreadable entries are logged and skipped."""
    entries: dict[int, ManifestEntry] = {}
    if not path.exists():
        return entries
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                entry = ManifestEntry.from_json(json.loads(text))
            except ValueError as e:  # json.JSONDecodeError is one
                log.warning("%s line %d: skipped (%s)", path, number, e)
                continue
            entries[entry.line] = entry
    return entries


def append_manifest(path: Path, entry: ManifestEntry) -> None:
    """Append one entry, flushed to disk before the next line is written."""
    with path.open("a", encoding="utf-8") as f:
        f.write(entry.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def _finished(line: BatchLine, entry: ManifestEntry | None, outdir: Path) -> bool:
    return (
        entry is not None
        and entry.digest == line.digest
        and len(entry.files) == line.image_count
        and all((outdir / name).is_file() for name in entry.files)
    )


def pending_lines(
    lines: Iterable[BatchLine], done: Mapping[int, ManifestEntry], outdir: Path
) -> tuple[BatchLine, ...]:
    """The lines to generate: those without an entry of the same hash whose files all exist."""
    return tuple(line for line in lines if not _finished(line, done.get(line.number), outdir))


# ---- generating a line (in this process or in a Ray actor)


@dataclass(frozen=True)
class LineOutput:
    images: tuple[GeneratedImage, ...]
    warnings: tuple[str, ...]
    seconds: float
    worker: str = ""  # host:pid of the process that generated it


@dataclass(frozen=True)
class LineFailure:
    message: str


@dataclass(frozen=True)
class PipelineSpec:
    """What to load: enough to build the same :class:`Pipeline` in this process or in a Ray actor (paths
    absolute, so that an actor with another working folder finds them)."""

    model: Path
    lora_dirs: tuple[Path, ...] = ()
    embeddings_dir: Path | None = None
    device: str = "auto"
    precision: str = "auto"

    def load(self) -> Pipeline:
        from sdstudio.engine import Pipeline, choose_device, choose_dtype

        device = choose_device(self.device)
        return Pipeline.from_file(
            self.model,
            dtype=choose_dtype(self.precision, device),
            device=device,
            lora_dirs=self.lora_dirs,
            embeddings_dir=self.embeddings_dir,
        )


def generate_line(
    pipeline: Pipeline, requests: Sequence[GenerationRequest], caps: Limits = DEFAULT_LIMITS
) -> LineOutput:
    """A line's images: each iteration's request through the pipeline, as the Python API runs it."""
    start = time.perf_counter()
    images: list[GeneratedImage] = []
    warnings: list[str] = []
    for request in requests:
        result = pipeline(request, limits=caps)
        images += result.images
        warnings += [w for w in result.warnings if w not in warnings]
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return LineOutput(tuple(images), tuple(warnings), time.perf_counter() - start, worker)


def _try_line(
    pipeline: Pipeline, requests: Sequence[GenerationRequest], caps: Limits
) -> LineOutput | LineFailure:
    """A failed line (a LoRA not found, out of memory, ...) fails alone; the batch goes on with the others."""
    try:
        return generate_line(pipeline, requests, caps)
    except SdStudioError as e:
        return LineFailure(str(e))
    except Exception as e:  # the line fails, with the traceback in the log
        log.exception("generating failed")
        return LineFailure(f"{type(e).__name__}: {e}")


class LineWorker:
    """A Ray actor's state: the pipeline, loaded once; ``run`` generates one line."""

    def __init__(self, spec: PipelineSpec, caps: Limits, threads: int | None = None) -> None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.caps = caps
        self.pipeline = spec.load()

    def run(self, requests: tuple[GenerationRequest, ...]) -> LineOutput | LineFailure:
        return _try_line(self.pipeline, requests, self.caps)


Job = tuple[BatchLine, tuple[GenerationRequest, ...]]
Outcome = tuple[BatchLine, LineOutput | LineFailure]


def _local_outcomes(spec: PipelineSpec, jobs: Sequence[Job], caps: Limits) -> Iterator[Outcome]:
    if not jobs:
        return  # nothing to do: the model is not loaded
    pipeline = spec.load()
    for line, requests in jobs:
        yield line, _try_line(pipeline, requests, caps)


# ---- Ray


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray for the run; "auto" or host:port: connect
    workers: int | None = None  # CPU actors; None: one actor per GPU of the cluster


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SdStudioError(f"--ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def cpu_worker_threads(node_cpus: Sequence[float], workers: int) -> int:
    """CPUs (and torch threads) per CPU actor: the cluster's CPUs shared out evenly, at most one node's,
    and ``SdStudioError`` when ``workers`` actors of that size cannot all be placed (they would wait
    forever)."""
    cpus = [int(c) for c in node_cpus]
    per = min(max(1, sum(cpus) // workers), max(cpus, default=0))
    room = sum(c // per for c in cpus) if per else 0
    if room < workers:
        raise SdStudioError(
            f"--workers {workers}: the Ray cluster has {sum(cpus)} CPUs, room for {room} CPU workers; "
            "pass fewer"
        )
    return per


def _start_actors(ray: Any, spec: PipelineSpec, caps: Limits, workers: int | None) -> list[Any]:
    remote = ray.remote(LineWorker)
    if workers is None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus == 0:
            raise SdStudioError("the Ray cluster has no GPU: pass --workers N to run N CPU workers")
        gpu_spec = dataclasses.replace(spec, device="cuda")  # Ray gives each actor its own GPU as cuda:0
        log.info("Ray: %d GPU workers", gpus)
        return [remote.options(num_gpus=1, num_cpus=1).remote(gpu_spec, caps) for _ in range(gpus)]
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    per = cpu_worker_threads(nodes, workers)
    cpu_spec = dataclasses.replace(spec, device="cpu")
    log.info("Ray: %d CPU workers of %d threads", workers, per)
    return [remote.options(num_cpus=per).remote(cpu_spec, caps, per) for _ in range(workers)]


def _ray_outcomes(
    spec: PipelineSpec, jobs: Sequence[Job], caps: Limits, options: RayOptions
) -> Iterator[Outcome]:
    """Each line to the next idle actor; outcomes in the order they finish. A Ray already initialised in this
    process is used as it is (and left running); else the run starts or connects to one, and ends it."""
    if not jobs:
        return
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        if options.address is None:
            ray.init(include_dashboard=False)
        else:
            ray.init(address=options.address)
    try:
        actors = _start_actors(ray, spec, caps, options.workers)
        queue = list(reversed(jobs))
        running: dict[Any, tuple[Any, BatchLine]] = {}
        idle = list(actors)
        while queue or running:
            while idle and queue:
                actor = idle.pop()
                line, requests = queue.pop()
                running[actor.run.remote(requests)] = (actor, line)
            if not running:  # every actor died: the lines left fail
                for line, _ in reversed(queue):
                    yield line, LineFailure("no Ray worker left to run it (see the errors above)")
                return
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, line = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as e:  # the actor died (model load failed, out of memory, ...)
                yield line, LineFailure(f"Ray worker failed: {e}")
                continue
            idle.append(actor)
            yield line, outcome
    finally:
        if started:
            ray.shutdown()


# ---- the run


@dataclass(frozen=True)
class BatchReport:
    finished: tuple[ManifestEntry, ...]  # lines generated by this run
    skipped: tuple[int, ...]  # lines a previous run finished
    failed: tuple[tuple[int, str], ...]  # line number, why


def _write_line(outdir: Path, manifest: Path, line: BatchLine, output: LineOutput) -> ManifestEntry:
    """The line's PNGs (atomically), its stale files from an earlier version of the line removed, then its
    manifest entry: an entry always names files that are complete."""
    names = file_names(line.number, len(output.images))
    for name, image in zip(names, output.images):
        save_png(image.image, outdir / name, image.infotext, overwrite=True)
    for old in outdir.glob(f"{line.number:05d}-*.png"):
        match = _OUTPUT_NAME.fullmatch(old.name)
        if match and int(match.group(1)) == line.number and old.name not in names:
            old.unlink()
    seeds = tuple(i.seed for i in output.images)
    entry = ManifestEntry(
        line.number, line.digest, names, seeds, output.seconds, output.warnings, output.worker
    )
    append_manifest(manifest, entry)
    return entry


def run_batch(
    lines: Sequence[BatchLine],
    outdir: str | os.PathLike,
    spec: PipelineSpec,
    *,
    ray: RayOptions | None = None,
    caps: Limits = DEFAULT_LIMITS,
    seeds: random.Random | None = None,
    on_line: Callable[[int, ManifestEntry | LineFailure], None] | None = None,
) -> BatchReport:
    """Generate the lines not finished in ``outdir``'s manifest, here or (``ray``) over Ray actors; this
    process writes every file. ``seeds``: draws the seeds of lines whose seed is -1 (default: the system's
    randomness); ``on_line``: called as each line finishes or fails."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    manifest = outdir / MANIFEST_NAME
    repair_manifest(manifest)
    done = read_manifest(manifest)
    todo = pending_lines(lines, done, outdir)
    todo_numbers = {line.number for line in todo}
    skipped = tuple(line.number for line in lines if line.number not in todo_numbers)
    if skipped:
        log.info("%d of %d lines already finished in %s", len(skipped), len(lines), manifest)
    rng = seeds or random.SystemRandom()
    jobs = [(line, line.requests(rng)) for line in todo]
    outcomes = _local_outcomes(spec, jobs, caps) if ray is None else _ray_outcomes(spec, jobs, caps, ray)
    finished: list[ManifestEntry] = []
    failed: list[tuple[int, str]] = []
    with contextlib.closing(outcomes):  # an error here ends the generator, and so the Ray it started
        for line, outcome in outcomes:
            if isinstance(outcome, LineFailure):
                failed.append((line.number, outcome.message))
                result: ManifestEntry | LineFailure = outcome
            else:
                result = _write_line(outdir, manifest, line, outcome)
                finished.append(result)
            if on_line is not None:
                on_line(line.number, result)
    return BatchReport(tuple(finished), skipped, tuple(failed))
