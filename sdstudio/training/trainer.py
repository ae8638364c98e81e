"""One training loop for every method: AdamW with linear warm-up, bf16 autocast, gradient clipping, an
EMA of the weights (Polyak averaging, as LDM's ``LitEma``), and checkpoints that resume after a kill.

What is trained is described by a ``loss_fn(step, generator) -> Tensor`` closure over the modules and the
data; the loop knows nothing about VAEs, text encoders or UNets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0: no EMA
    ema_start: int = 0  # steps before the EMA starts following the weights
    bf16: bool = True  # autocast matmuls/convs to bf16 (fast on AMX / AVX-512 bf16 CPUs and on GPUs)
    cosine: bool = True  # cosine decay to lr_min_ratio * lr after warm-up
    lr_min_ratio: float = 0.1
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if not config.cosine:
        return config.lr
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.lr * config.lr_min_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def train(
    module: nn.Module,
    loss_fn: Callable[[int, torch.Generator], Tensor],
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    parameters: Iterable[nn.Parameter] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[TrainResult, EMA | None]:
    """Train ``module`` (its trainable ``parameters``) for ``config.steps`` steps of ``loss_fn``.

    ``out_dir`` holds ``train_state.pt`` (weights, optimiser, EMA, step, RNG) written atomically every
    ``checkpoint_every`` steps and at the end; an existing one is resumed from, so a killed run loses at
    most ``checkpoint_every`` steps. ``log.jsonl`` gets a line every ``log_every`` steps.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in (parameters if parameters is not None else module.parameters()) if p.requires_grad]
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
    )
    ema = EMA(module, config.ema_decay) if config.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(config.seed)
    start = 0
    state_path = out / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("config") != asdict(config) | {"betas": list(config.betas)}:
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

    def save(step: int) -> None:
        state = {
            "config": asdict(config) | {"betas": list(config.betas)},
            "module": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.shadow if ema is not None else {},
            "rng": generator.get_state(),
            "step": step,
        }
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))

    module.train()
    t0 = time.perf_counter()
    loss_value = float("nan")
    running = 0.0
    with open(out / LOG_FILE, "a") as log_file:
        for step in range(start, config.steps):
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss = loss_fn(step, generator)
            if not torch.isfinite(loss):
                raise SdStudioError(f"training diverged at step {step} (loss {loss.item()}); lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(module, 0.0 if step < config.ema_start else None)
            loss_value = loss.item()
            running = loss_value if step == start else 0.98 * running + 0.02 * loss_value
            if progress is not None:
                progress(step + 1, running)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                record = {"step": step + 1, "loss": loss_value, "smoothed": running, "lr": lr,
                          "seconds": round(time.perf_counter() - t0, 2)}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                save(step + 1)
    if start < config.steps:
        save(config.steps)
    module.eval()
    return TrainResult(config.steps, loss_value, time.perf_counter() - t0, start), ema
