"""One training loop for every method: AdamW (or bitsandbytes' 8-bit AdamW) with linear warm-up and a
constant, cosine or linear schedule, bf16 autocast, gradient accumulation, gradient clipping, an EMA of the
weights (Polyak averaging, as LDM's ``LitEma``, optionally with its warm-up), and checkpoints that resume
after a kill.

What is trained is described by a ``loss_fn(index, generator) -> Tensor`` closure over the modules and the
data; the loop knows nothing about VAEs, text encoders or UNets. With gradient accumulation over ``k``
micro-batches, optimizer step ``s`` calls ``loss_fn`` with ``index = s * k + i`` for ``i < k`` (each
micro-batch its own data), and the gradient is the mean of the ``k`` losses' (as diffusers' and kohya's
``accelerator.accumulate``); with ``k = 1`` the index is the step.

Data-parallel (under torchrun, ``sdstudio.training.distributed``): every rank runs this loop with the same
generator; after the micro-batches' backward passes the trainable parameters' gradients are averaged over
the ranks (before clipping), so every rank takes the same step; the logged loss is the ranks' mean; rank 0
alone writes ``train_state.pt``, ``log.jsonl`` and ``loss.png`` (the others wait), and every rank resumes
from the same ``train_state.pt``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write
from sdstudio.training.distributed import ALONE, Shard, all_reduce_gradients, broadcast_parameters

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"

Schedule = Literal["constant", "cosine", "linear"]
EmaWarmup = Literal["none", "ldm", "power"]
OptimizerName = Literal["adamw", "adamw8bit"]
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")
EMA_WARMUPS: tuple[str, ...] = ("none", "ldm", "power")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class TrainConfig:
    steps: int  # optimizer steps
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0: no EMA
    ema_start: int = 0  # steps before the EMA starts following the weights
    bf16: bool = True  # autocast matmuls/convs to bf16 (fast on AMX / AVX-512 bf16 CPUs and on GPUs)
    cosine: bool = True  # cosine decay to lr_min_ratio * lr after warm-up (when ``schedule`` is None)
    lr_min_ratio: float = 0.1
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    # None: "cosine" if ``cosine`` else "constant"; "linear" decays to lr_min_ratio * lr at ``steps``
    schedule: Schedule | None = None
    grad_accumulation: int = 1  # micro-batches per optimizer step
    # EMA warm-up: "ldm" min(decay, (1 + n) / (10 + n)) (LDM LitEma, diffusers EMAModel's default);
    # "power" min(decay, 1 - (1 + n / inv_gamma) ** -power) (diffusers use_ema_warmup); n counts the updates
    ema_warmup: EmaWarmup = "none"
    ema_inv_gamma: float = 1.0
    ema_power: float = 2 / 3
    optimizer: OptimizerName = "adamw"  # "adamw8bit": bitsandbytes' AdamW8bit (8-bit moments)

    def __post_init__(self) -> None:
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise SdStudioError(f"learning-rate schedule {self.schedule!r}: choose {', '.join(SCHEDULES)}")
        if self.ema_warmup not in EMA_WARMUPS:
            raise SdStudioError(f"EMA warm-up {self.ema_warmup!r}: choose {', '.join(EMA_WARMUPS)}")
        if self.optimizer not in OPTIMIZERS:
            raise SdStudioError(f"optimizer {self.optimizer!r}: choose {', '.join(OPTIMIZERS)}")
        if self.grad_accumulation < 1:
            raise SdStudioError(f"gradient accumulation {self.grad_accumulation}: must be at least 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise SdStudioError(f"EMA decay {self.ema_decay}: must be in [0, 1) (0.9999 is usual; 0: no EMA)")

    @property
    def lr_schedule(self) -> str:
        return self.schedule or ("cosine" if self.cosine else "constant")


def learning_rate(config: TrainConfig, step: int, base: float | None = None) -> float:
    """The learning rate of optimizer step ``step`` (from 0) for a group whose rate is ``base`` (None:
    ``config.lr``): linear warm-up over ``warmup`` steps, then constant, cosine or linear decay to
    ``lr_min_ratio * base`` at ``steps`` (transformers' ``get_{cosine,linear}_schedule_with_warmup`` with a
    floor)."""
    lr = config.lr if base is None else base
    if step < config.warmup:
        return lr * (step + 1) / config.warmup
    schedule = config.lr_schedule
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    floor = lr * config.lr_min_ratio
    if schedule == "linear":
        return floor + (lr - floor) * (1.0 - progress)
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay(config: TrainConfig, step: int) -> float:
    """The EMA decay of the update after optimizer step ``step`` (from 0): 0 (copy the weights) before
    ``ema_start``, then ``ema_decay`` or its warm-up with ``n = step + 1 - ema_start`` updates so far (the
    first update has ``n = 1``, as LitEma counts ``num_updates``)."""
    if step < config.ema_start:
        return 0.0
    n = step + 1 - config.ema_start
    if config.ema_warmup == "ldm":
        return min(config.ema_decay, (1 + n) / (10 + n))
    if config.ema_warmup == "power":
        return min(config.ema_decay, 1 - (1 + n / config.ema_inv_gamma) ** -config.ema_power)
    return config.ema_decay


class EMA:
    """Exponential moving average of a module's parameters, kept as a separate module copy."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    resumed_from: int


# (param groups, config) -> optimizer; each group has "params", "lr" and "weight_decay"
OptimizerFactory = Callable[[list[dict[str, Any]], TrainConfig], torch.optim.Optimizer]
ParameterGroup = Mapping[str, Any]  # {"params": [...], "lr": float}: a group with its own learning rate


def _adamw8bit(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """bitsandbytes' ``AdamW8bit`` (Dettmers et al. 2022, block-wise 8-bit moments), probed with one step on
    the parameters' device first, so a platform it does not run on fails before the run, by name."""
    try:
        import bitsandbytes as bnb  # an optional dependency: only this optimizer needs it
    except ImportError as e:
        raise SdStudioError(
            f"optimizer adamw8bit needs bitsandbytes, which cannot be imported here ({e}); "
            "pip install bitsandbytes, or use the optimizer adamw"
        ) from None
    device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    try:
        probe = nn.Parameter(torch.ones(4096, device=device))  # 4096: bnb's smallest 8-bit tensor
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
        if not torch.isfinite(probe).all():
            raise RuntimeError("the probe step gave non-finite weights")
    except Exception as e:  # noqa: BLE001 - whatever the native library raises on a platform it lacks
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SdStudioError(
            f"optimizer adamw8bit: bitsandbytes {getattr(bnb, '__version__', '?')} does not run on {device} "
            f"({first}); use the optimizer adamw"
        ) from None
    return bnb.optim.AdamW8bit(groups, lr=config.lr, betas=config.betas)


def build_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """``config.optimizer``'s optimizer over ``groups``: torch's AdamW, or bitsandbytes' AdamW8bit."""
    if config.optimizer == "adamw8bit":
        return _adamw8bit(groups, config)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _param_groups(
    parameters: Iterable[nn.Parameter] | Iterable[ParameterGroup], config: TrainConfig
) -> tuple[list[dict[str, Any]], list[nn.Parameter]]:
    """Optimizer groups (for each given group: its matrices with weight decay, then its vectors without, as
    is usual for AdamW) and the flat list of trainable parameters."""
    entries = list(parameters)
    given = (
        [dict(e) for e in entries]
        if entries and isinstance(entries[0], Mapping)
        else [{"params": entries, "lr": config.lr}]
    )
    groups, flat = [], []
    for group in given:
        params = [p for p in group["params"] if p.requires_grad]
        lr = float(group.get("lr", config.lr))
        groups.append(
            {"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": config.weight_decay}
        )
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
        flat += params
    return groups, flat


def _record(config: TrainConfig) -> dict[str, Any]:
    return asdict(config) | {"betas": list(config.betas)}


def _same_settings(saved: object, config: TrainConfig) -> bool:
    """Whether a saved config is ``config``; fields added to TrainConfig since it was saved take their
    defaults (which keep the old behaviour), so older runs still resume."""
    names = {f.name for f in fields(TrainConfig)}
    if not isinstance(saved, dict) or not set(saved) <= names:
        return False
    try:
        old = TrainConfig(**{k: tuple(v) if k == "betas" else v for k, v in saved.items()})
    except (TypeError, ValueError, SdStudioError):
        return False
    return old == config


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively (a CUDA GPU that supports bf16; a CPU with oneDNN's bf16
    kernels: AVX-512 BF16 or AMX). Elsewhere bf16 autocast is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def train(
    module: nn.Module,
    loss_fn: Callable[[int, torch.Generator], Tensor],
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    parameters: Iterable[nn.Parameter] | Iterable[ParameterGroup] | None = None,
    progress: Callable[[int, float], None] | None = None,
    ema_module: nn.Module | None = None,
    make_optimizer: OptimizerFactory | None = None,
    shard: Shard = ALONE,
    on_save: Callable[[int], None] | None = None,
) -> tuple[TrainResult, EMA | None]:
    """Train ``module`` (its trainable ``parameters``) for ``config.steps`` optimizer steps of ``loss_fn``.

    ``parameters``: parameters, or groups ``{"params": [...], "lr": rate}`` each scheduled from its own rate
    (a text encoder's lower rate, say); None: ``module.parameters()``. ``ema_module``: the part of ``module``
    the EMA follows (None: all of it). ``make_optimizer``: builds the optimizer from the groups (None:
    ``build_optimizer``, by ``config.optimizer``). ``on_save(step)``: called on rank 0 after each save of
    the state (every ``checkpoint_every`` steps and at the end), for a method's intermediate file and preview.

    ``out_dir`` holds ``train_state.pt`` (weights, optimiser, EMA, step, RNG) written atomically every
    ``checkpoint_every`` steps and at the end; an existing one is resumed from, so a killed run loses at
    most ``checkpoint_every`` steps. ``log.jsonl`` gets a line every ``log_every`` steps and ``loss.png``
    plots it at every save.

    ``shard``: this process's place in a data-parallel run (see the module docstring); ``loss_fn`` then
    returns this rank's share of the loss (``Denoiser.training_loss(rows=...)``), whose mean over the ranks
    is the global batch's loss. Rank 0 writes the files; the others must see ``out_dir`` to resume.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups, params = _param_groups(parameters if parameters is not None else module.parameters(), config)
    base_lrs = [g["lr"] for g in groups]
    optimizer = (make_optimizer or build_optimizer)(groups, config)
    followed = module if ema_module is None else ema_module
    ema = EMA(followed, config.ema_decay) if config.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(config.seed)
    device_type = params[0].device.type if params else "cpu"
    bf16 = config.bf16 and bf16_native(torch.device(device_type))
    if config.bf16 and not bf16:
        log.info("no native bf16 on this %s: training in float32 (emulated bf16 is slower)", device_type)
    start = 0
    state_path = out / STATE_FILE
    found = state_path.exists()
    if found:
        # mapped, not read: an sd15 fine-tune's state (weights, moments, EMA) is several times the model
        state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
        if not _same_settings(state.get("config"), config):
            raise SdStudioError(
                f"{state_path}: was written by a run with other settings; use a new --out folder or delete it"
            )
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.shadow = state["ema"]
        generator.set_state(state["rng"])
        start = state["step"]
        log.info("resuming %s from step %d", out, start)
    shard.check_same(
        (found, start), f"training state in {out} (present, step)",
        "put the run folder on a filesystem every node sees to resume (or start it again with --overwrite)",
    )  # fmt: skip
    broadcast_parameters(params, shard)  # as DDP does: every rank starts from rank 0's weights

    def save(step: int) -> None:
        state = {
            "config": _record(config),
            "module": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.shadow if ema is not None else {},
            "rng": generator.get_state(),
            "step": step,
        }
        if shard.main:
            atomic_write(state_path, lambda tmp: torch.save(state, tmp))
            plot_loss(out / LOG_FILE, out / PLOT_FILE)
            if on_save is not None:  # a method's intermediate file and preview (after the state: a kill
                on_save(step)  # during it loses nothing)
        shard.barrier()  # no rank runs ahead of a checkpoint it might resume from

    module.train()
    t0 = time.perf_counter()
    loss_value = float("nan")
    running = 0.0
    k = config.grad_accumulation
    reduce_on = params[0].device if params else torch.device("cpu")
    with open(out / LOG_FILE, "a") if shard.main else contextlib.nullcontext() as log_file:
        for step in range(start, config.steps):
            lr = learning_rate(config, step)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = learning_rate(config, step, base)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(k):
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(step * k + micro, generator)
                if not torch.isfinite(loss):
                    if not shard.distributed:
                        raise SdStudioError(
                            f"training diverged at step {step} (loss {loss.item()}); lower the learning rate"
                        )
                    total = math.nan  # every rank learns it from the mean below and stops there
                    continue
                (loss / k if k > 1 else loss).backward()
                total += loss.item()
            if shard.distributed:
                total = shard.mean(total, reduce_on)
                if not math.isfinite(total):
                    raise SdStudioError(
                        f"training diverged at step {step} (mean loss {total / k} over {shard.world} ranks); "
                        "lower the learning rate"
                    )
                all_reduce_gradients(params, shard)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(followed, ema_decay(config, step))
            loss_value = total / k
            running = loss_value if step == start else 0.98 * running + 0.02 * loss_value
            if progress is not None:
                progress(step + 1, running)
            if log_file is not None and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
                record = {"step": step + 1, "loss": loss_value, "smoothed": running, "lr": lr,
                          "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                save(step + 1)
    if start < config.steps:
        save(config.steps)
    module.eval()
    return TrainResult(config.steps, loss_value, time.perf_counter() - t0, start), ema


def read_log(path: str | os.PathLike) -> list[dict[str, float]]:
    """The records of a ``log.jsonl``, one per step: a resumed run logs the steps after its last save again,
    and the later line wins. Sorted by step."""
    records: dict[int, dict[str, float]] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
            records[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return [records[s] for s in sorted(records)]


def plot_loss(
    log_path: str | os.PathLike, png: str | os.PathLike, size: tuple[int, int] = (640, 360)
) -> Path | None:
    """Draw ``log.jsonl``'s loss (grey) and smoothed loss (blue) against the step into ``png`` with Pillow;
    None (and nothing written) while the log has fewer than two records."""
    records = read_log(log_path)
    if len(records) < 2:
        return None
    width, height = size
    left, right, top, bottom = 56, 12, 24, 28
    steps = [r["step"] for r in records]
    series = {key: [float(r[key]) for r in records] for key in ("loss", "smoothed")}
    values = [v for vs in series.values() for v in vs if math.isfinite(v)]
    low, high = min(values), max(values)
    if high <= low:
        high = low + 1e-6

    def xy(step: float, value: float) -> tuple[float, float]:
        x = left + (step - steps[0]) / max(1, steps[-1] - steps[0]) * (width - left - right)
        y = top + (high - value) / (high - low) * (height - top - bottom)
        return x, y

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((left, top, width - right, height - bottom), outline=(160, 160, 160))
    for key, colour in (("loss", (190, 190, 190)), ("smoothed", (30, 90, 200))):
        draw.line([xy(s, v) for s, v in zip(steps, series[key])], fill=colour, width=2)
    draw.text((left, 4), f"loss (grey) and smoothed (blue), steps {steps[0]}-{steps[-1]}", fill="black")
    draw.text((4, top - 4), f"{high:.4g}", fill="black")
    draw.text((4, height - bottom - 8), f"{low:.4g}", fill="black")
    draw.text((left, height - bottom + 6), str(steps[0]), fill="black")
    draw.text((width - right - 40, height - bottom + 6), str(steps[-1]), fill="black")
    return atomic_write(png, lambda tmp: image.save(tmp, format="PNG"))
