"""LoRA and LoCon training (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; kohya
sd-scripts ``networks/lora.py``): low-rank factors learnt beside the frozen weights of the model that
generates, written as the kohya ``.safetensors`` that ``<lora:...>`` and diffusers' ``load_lora_weights`` read.

What trains (kohya's ``LoRANetwork``): the transformer blocks' linears and 1x1 projections of the UNet
(attention q, k, v, out; the GEGLU and output feed-forward linears; proj_in / proj_out), with LoCon
(``conv_rank``) also the ResNet blocks and the down / up samplers (3x3 convolutions at ``conv_rank``, their
linears and 1x1 shortcuts at ``rank``), and with ``train_text_encoder`` the text encoder's attention and MLP
linears. Which weight each kohya name stands for comes from the inference key table
(``adapters.bake.kohya_modules``), so the file names exactly the weights that were trained. Each module
holds kohya's ``LoRAModule`` parameters under kohya's names (``<name>.lora_down.weight`` [r, in(, kh, kw)],
``<name>.lora_up.weight`` [out, r(, 1, 1)], ``<name>.alpha``), so the state dict is the file; it changes
its target's output by ``alpha / r * up(down(x))``. Initialisation as kohya's and Microsoft's loralib:
``down`` Kaiming-uniform with ``a = sqrt(5)``, ``up`` zeros, so training starts at the base model exactly.

How the factors enter the forward pass. Inference merges LoRAs into the weights as data; training needs the
factors as parameters in the graph. Three ways, measured on one sd15 training step (512x512, batch 1, rank 16
on kohya's default UNet targets, frozen weights bf16 and channels-last, bf16 autocast, AdamW; 2-thread Xeon
with AMX, load average under 2; ``OMP_NUM_THREADS=2 python benchmarks/lora_train_step.py --channels-last
--side ours --variant hooks|merged|parametrize``), seconds per step and peak RSS the training adds:

* side branches, ``y + scale * up(down(x))``, from ``register_forward_hook`` on the target modules (PyTorch's
  documented extension point; nothing of the model is replaced): 3.70 s, +1.79 GB. Only the factors need
  gradients; no gradient as large as a base weight is ever formed. The scale is folded into ``up`` and, for
  linears, the sum into the up-projection's GEMM (``addmm``). Chosen: the fastest and the leanest.
* merged weights per step, ``W0 + scale * up @ down`` passed by ``torch.func.functional_call``: 4.38 s,
  +2.11 GB. Autograd forms each target's full ``[out, in]`` weight gradient (a product as large as the
  forward's) before reducing it onto the factors, and keeps every merged weight for the backward.
* ``torch.nn.utils.parametrize``: 4.65 s, +2.29 GB; the same merged weights, and it swaps each target
  module's class for a generated one (the house style forbids that).

A hook only runs when its module is called. Two kinds of target are not: the GEGLU projection, whose weight
``prepacked.Linear.gelu_gated`` reads itself (it calls ``self.forward``, not ``self``), and SD 2's q / k / v,
row blocks of OpenCLIP's packed ``in_proj_weight``. Those get the merged weight (one ``addmm``) through
``functional_call``, the only clean way to change what a module's weight is for one call; so ``attached``
hands out the modules to call, ``run.unet`` and ``run.text_encoder``, which are the model's own modules when
no such target trains. With ``gelu_gated`` calling ``self(x)`` (a one-line change in ``prepacked``, not made
here) the GEGLU projections take hooks too: 3.59 s, +1.55 GB; drop the GEGLU case of ``_hookable`` then.

Against diffusers + PEFT on the same step (``benchmarks/lora_train_step.py``): 3.70 s against 3.92 s (1.06x)
and +1.79 GB against +2.02 GB; both NCHW 3.84 s against 3.81 s. A third of the step is the fused attention's
backward and a fifth the convolutions' input gradients, the same oneDNN kernels on both sides; what differs,
the LoRA plumbing (PEFT casts every input to float32 and scales and adds in separate passes), is under a
tenth of it.

Precision: the factors are float32 master weights; the frozen model may be float32 or bf16 (kohya and
diffusers keep frozen weights in the mixed-precision dtype). Under the trainer's bf16 autocast the branches
run in bf16 like the layers they follow. With bf16 weights, layers whose input needs no gradient (the time
embedding, the first blocks before any branch, every ResBlock's ``emb_layers``) keep the oneDNN-packed fast
path (``prepacked.packable``: nothing in them wants a gradient); all others run the plain kernels, as training
needs. Nothing of the model is written: after ``attached`` the model is bit for bit what it was, its
``requires_grad`` flags too, and its packed caches stay valid (their key is the weights' version).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import skip_init

from sdstudio.adapters.bake import KohyaModule, kohya_modules
from sdstudio.adapters.hashes import addnet_hash
from sdstudio.adapters.keys import Part, key_table
from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write, check_writable
from sdstudio.models.loading import DTYPES, LoadedModel
from sdstudio.models.stablediffusion import TEXT_PREFIX, UNET_PREFIX, StableDiffusion
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.models.unet import GEGLU
from sdstudio.prompt.conditioning import encode_padded, tokenize_attention
from sdstudio.prompt.embeddings import EmbeddingDatabase, load_embeddings_for
from sdstudio.training.datasets import scan_dataset
from sdstudio.training.distributed import Rows, shard_from_env
from sdstudio.training.dreambooth import (
    EMBEDDINGS_FOLDER,
    PriorPreservation,
    check_class_folder,
    class_captions,
    class_folder,
    open_class_data,
    prior_preservation_loss,
)
from sdstudio.training.embedding import EmbeddingTrainConfig, TrainableEmbedding, save_embedding
from sdstudio.training.finetune import (
    LoopOptions,
    RunConfig,
    TrainingData,
    check_names_embedding,
    check_patterns,
    dataset_config_for,
    jsonable,
    prepare_run_folder,
    run_settings,
)
from sdstudio.training.preview import SAVES_FOLDER, PreviewSettings, render_preview, saved_name
from sdstudio.training.trainer import bf16_native, train

log = logging.getLogger(__name__)

__all__ = [
    "AttachedLoRA",
    "LoraModule",
    "LoraRunOptions",
    "LoraTrainConfig",
    "TrainableLoRA",
    "attached",
    "encode_training_captions",
    "kohya_metadata",
    "lora_loss",
    "param_groups",
    "save_kohya",
    "train_lora",
]

_PART_PREFIX: dict[Part, str] = {"unet": UNET_PREFIX, "te": TEXT_PREFIX}


@dataclass(frozen=True)
class LoraTrainConfig:
    """kohya's network options: ``--network_dim``, ``--network_alpha``, ``--network_args conv_dim=..
    conv_alpha=..`` (LoCon), ``--network_train_unet_only`` (the opposite of ``train_text_encoder``),
    ``--unet_lr``, ``--text_encoder_lr``. No dropout. An alpha left out equals its rank (scale 1, as
    diffusers' training scripts set it; kohya's own defaults are dim 4 / alpha 1, conv alpha 1)."""

    rank: int = 16
    alpha: float | None = None
    conv_rank: int | None = None  # None: no LoCon (ResNet blocks and samplers untouched)
    conv_alpha: float | None = None
    train_text_encoder: bool = False
    unet_lr: float = 1e-4
    text_lr: float = 5e-5
    # sdstudio's own module filter (--modules / --skip-modules): regular expressions searched in the kohya
    # name of each module kohya would train (lora_unet_..._attn2_to_k); with ``modules`` only those one of
    # them finds, never one a ``skip_modules`` pattern finds. (kohya's include_patterns differ: they only
    # take modules back from its exclude_patterns.)
    modules: tuple[str, ...] = ()
    skip_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_patterns("--modules", self.modules)
        check_patterns("--skip-modules", self.skip_modules)
        if self.rank < 1:
            raise SdStudioError(f"LoRA rank {self.rank}: must be at least 1")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise SdStudioError(
                f"LoCon rank {self.conv_rank}: must be at least 1 (leave it out for no convolutions)"
            )
        if self.conv_alpha is not None and self.conv_rank is None:
            raise SdStudioError("a LoCon alpha needs a LoCon rank (conv_rank); give both or neither")
        for name, value in (("alpha", self.alpha), ("conv alpha", self.conv_alpha)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise SdStudioError(f"LoRA {name} {value}: must be a positive number")
        for name, value in (("UNet", self.unet_lr), ("text encoder", self.text_lr)):
            if not (math.isfinite(value) and 0 <= value < 10):
                raise SdStudioError(
                    f"{name} learning rate {value}: must be a number in [0, 10) (1e-4 is usual)"
                )

    @property
    def network_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def locon_alpha(self) -> float | None:
        if self.conv_rank is None:
            return None
        return float(self.conv_rank if self.conv_alpha is None else self.conv_alpha)

    def rank_alpha(self, module: KohyaModule) -> tuple[int, float]:
        """kohya's choice per module: 3x3 convolutions at the LoCon rank and alpha, all else at the network's."""
        if module.convolution and self.conv_rank is not None:
            return self.conv_rank, self.locon_alpha  # type: ignore[return-value]
        return self.rank, self.network_alpha

    def chosen(self, module: KohyaModule) -> bool:
        """kohya's targets: transformer blocks always, ResNet blocks and samplers with LoCon, text with
        ``train_text_encoder``; never conv_in, conv_out or the time embedding. Then the patterns: a module
        an exclude pattern finds is left out, and with include patterns only one they find is kept."""
        if module.block == "transformer":
            kohya = True
        elif module.block in ("resnet", "sampler"):
            kohya = self.conv_rank is not None
        else:
            kohya = module.block == "text" and self.train_text_encoder
        if not kohya or any(re.search(p, module.name) for p in self.skip_modules):
            return False
        return not self.modules or any(re.search(p, module.name) for p in self.modules)


class LoraModule(nn.Module):
    """kohya's ``LoRAModule`` parameters for one target: ``lora_down`` (the target's kernel, stride and
    padding; in -> r), ``lora_up`` (r -> out, 1x1) and the ``alpha`` buffer; the change is
    ``alpha / r * up(down(x))``."""

    def __init__(
        self,
        shape: tuple[int, ...],
        rank: int,
        alpha: float,
        conv: nn.Conv2d | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        out, fan_in = shape[0], shape[1]
        # skip_init: no default initialisation, which would draw from the global generator
        self.lora_down: nn.Linear | nn.Conv2d
        self.lora_up: nn.Linear | nn.Conv2d
        if len(shape) == 4:
            geometry = (
                {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation} if conv else {}
            )
            kernel = tuple(shape[2:])
            self.lora_down = skip_init(nn.Conv2d, fan_in, rank, kernel, bias=False, device=device, **geometry)
            self.lora_up = skip_init(nn.Conv2d, rank, out, 1, bias=False, device=device)
        else:
            self.lora_down = skip_init(nn.Linear, fan_in, rank, bias=False, device=device)
            self.lora_up = skip_init(nn.Linear, rank, out, bias=False, device=device)
        self.register_buffer("alpha", torch.tensor(float(alpha), device=device))
        self.scale = float(alpha) / rank
        with torch.no_grad():  # kohya / loralib: the product starts at exactly zero
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_up.weight)

    @property
    def rank(self) -> int:
        return self.lora_down.weight.shape[0]

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        """The forward hook on the target module: ``output + scale * up(down(x))`` for its input ``x``.

        The scale is folded into ``up``'s weight (an [out, r] product, not a pass over the output) and, for a
        linear target, the sum into the up-projection's GEMM (``addmm``, beta 1). Without autocast the branch
        runs in the factors' dtype and is cast to the output's (the frozen model may be bf16)."""
        x = args[0]
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast:
            x = x.to(self.lora_down.weight.dtype)
        up = self.lora_up.weight * self.scale  # [out, r(, 1, 1)]
        if isinstance(self.lora_down, nn.Conv2d):
            h = self.lora_down(x)  # [B, r, h', w']
            return torch.add(output, F.conv2d(h if autocast else h.to(output.dtype), up.to(output.dtype)))
        h = F.linear(x, self.lora_down.weight)  # [..., r]
        if not autocast:
            h, up = h.to(output.dtype), up.to(output.dtype)
        flat = torch.addmm(output.reshape(-1, output.shape[-1]), h.reshape(-1, h.shape[-1]), up.t())
        return flat.view(output.shape)

    def delta(self) -> Tensor:
        """``scale * up @ down`` shaped as the target's weight, [out, in] or [out, in, kh, kw]."""
        down = self.lora_down.weight
        product = self.lora_up.weight.flatten(1) @ down.flatten(1)  # [out, in * kh * kw]
        return (product * self.scale).view(product.shape[0], *down.shape[1:])

    def merged(self, base: Tensor) -> Tensor:
        """``base + scale * up @ down``, shaped as ``base`` (the target's weight): one ``addmm`` (beta 1, alpha
        the scale), no separate product, scaling and sum over the full weight. Without autocast in
        ``base``'s dtype."""
        up, down = self.lora_up.weight.flatten(1), self.lora_down.weight.flatten(1)  # [out, r], [r, in * k]
        if not torch.is_autocast_enabled(base.device.type):
            up, down = up.to(base.dtype), down.to(base.dtype)
        return torch.addmm(base.flatten(1), up, down, alpha=self.scale).view(base.shape)


@dataclass(frozen=True)
class _Target:
    module: KohyaModule
    path: str  # the module of the model whose output the branch is added to, or "" for a merged target
    relative_key: str  # the weight's key inside the part (``model.unet`` / ``model.text_encoder``)


def _hookable(model: StableDiffusion, module: KohyaModule) -> str:
    """The path of the module whose call produces the target's output (a hook there adds the branch), or ""
    where no call does: a row block of a packed weight, or a layer whose owner reads its weight itself."""
    key = module.target.key
    if module.target.rows is not None or not key.endswith(".weight"):
        return ""
    path = key.removesuffix(".weight")
    layer = model.get_submodule(path)
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        return ""
    owner = model.get_submodule(path.rpartition(".")[0])
    if isinstance(owner, GEGLU):  # GEGLU.forward is ``proj.gelu_gated(x)``: no call of ``proj``, no hook
        return ""
    return path


class TrainableLoRA(nn.Module):
    """The factors being learnt for one model: one ``LoraModule`` per kohya target, registered under its kohya
    name, so that ``state_dict()`` is the kohya file's tensors. Holds no reference to the model."""

    def __init__(self, model: StableDiffusion, config: LoraTrainConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        table = key_table(model)
        self.architecture = table.architecture
        self.v2 = model.config.text.kind == "open_clip"
        self.prediction = model.config.prediction
        self.created_at = time.time()  # kohya's ss_training_started_at
        self.attached_to: int | None = None  # id of the model whose forward has the branches now
        generator = torch.Generator().manual_seed(seed)
        device = next(model.parameters()).device
        self.targets: dict[str, _Target] = {}
        for module in kohya_modules(table):
            if not config.chosen(module):
                continue
            path = _hookable(model, module)
            layer = model.get_submodule(path) if path else None
            rank, alpha = config.rank_alpha(module)
            conv = layer if isinstance(layer, nn.Conv2d) else None
            self.add_module(
                module.name, LoraModule(module.target.shape, rank, alpha, conv, generator, device)
            )
            relative = module.target.key.removeprefix(_PART_PREFIX[module.target.part])
            self.targets[module.name] = _Target(module, path, relative)
        if not self.targets:
            if config.modules or config.skip_modules:
                raise SdStudioError(
                    f"{self.architecture}: --modules {list(config.modules)} / --skip-modules "
                    f"{list(config.skip_modules)} leave no LoRA target; they are searched in kohya's names "
                    "such as lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
                )
            raise SdStudioError(
                f"{self.architecture}: no LoRA target found; is this a Stable Diffusion model?"
            )

    def factors(self, name: str) -> LoraModule:
        return self.get_submodule(name)  # type: ignore[return-value]

    def names(self, part: Part | None = None) -> list[str]:
        return [n for n, t in self.targets.items() if part is None or t.module.target.part == part]

    @property
    def trains_text(self) -> bool:
        return bool(self.names("te"))

    def merged_weights(self, part_module: nn.Module, part: Part) -> dict[str, Tensor]:
        """``W0 + scale * up @ down`` for the part's targets no hook reaches, by their keys inside the part
        (SD 2's q / k / v: their row blocks of one ``in_proj_weight``, rows no target covers unchanged)."""
        by_key: dict[str, list[tuple[tuple[int, int] | None, LoraModule]]] = {}
        for name, target in self.targets.items():
            if not target.path and target.module.target.part == part:
                by_key.setdefault(target.relative_key, []).append(
                    (target.module.target.rows, self.factors(name))
                )
        weights = {}
        for key, modules in by_key.items():
            base = part_module.get_parameter(key)
            if modules[0][0] is None:
                weights[key] = modules[0][1].merged(base)
                continue
            blocks, row = [], 0  # row blocks in order, the base's rows between them
            for (first, last), factors in sorted(modules, key=lambda m: m[0]):  # type: ignore[arg-type,misc]
                blocks += [base[row:first], factors.merged(base[first:last])]
                row = last
            weights[key] = torch.cat([*blocks, base[row:]])
        return weights


class _MergedCall(nn.Module):
    """Calls ``module`` with some of its weights replaced for the call by ``weights()`` (PyTorch's
    ``torch.func.functional_call``: the module is unchanged after it)."""

    def __init__(self, module: nn.Module, weights: Callable[[], dict[str, Tensor]]) -> None:
        super().__init__()
        self.module = module
        self._weights = weights

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, self._weights(), args, kwargs)


@dataclass(frozen=True)
class AttachedLoRA:
    """A model with a LoRA's branches in its forward pass (``attached``): call ``unet`` / ``text_encoder``
    (or ``denoiser``), not the model's own, for the targets that need the merged weight."""

    model: StableDiffusion
    lora: TrainableLoRA
    unet: nn.Module
    text_encoder: nn.Module
    denoiser: Denoiser
    hooks: list[Any] = dataclasses.field(default_factory=list, repr=False)  # the branches' hook handles

    @contextlib.contextmanager
    def suspended(self) -> Iterator[StableDiffusion]:
        """The model without the branches for the body of the ``with`` (a preview generates with the saved
        file merged into the weights instead: the branches would add the LoRA a second time)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        try:
            yield self.model
        finally:
            self.hooks.extend(_register_hooks(self.model, self.lora))

    def base(self) -> Denoiser:
        """The denoiser of the model without the branches: the base, prior preservation's teacher
        (``PriorPreservation.target == "base"``). Each call suspends the branches for its duration."""
        return Denoiser(_WithoutBranches(self), self.denoiser.schedule, self.denoiser.prediction)


class _WithoutBranches(nn.Module):
    """The model's UNet called with the LoRA's branches suspended (``AttachedLoRA.base``)."""

    def __init__(self, run: AttachedLoRA) -> None:
        super().__init__()
        self.unet = run.model.unet  # the model's own (its parameters: the denoiser reads their dtype)
        self.run = run

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.run.suspended():
            return self.unet(*args, **kwargs)


def _register_hooks(model: StableDiffusion, lora: TrainableLoRA) -> list[Any]:
    return [
        model.get_submodule(target.path).register_forward_hook(lora.factors(name).hook)
        for name, target in lora.targets.items()
        if target.path
    ]


def _check_fits(model: StableDiffusion, lora: TrainableLoRA) -> None:
    params = dict(model.named_parameters())
    for name, target in lora.targets.items():
        t = target.module.target
        param = params.get(t.key)
        rows = t.rows or (0, 0 if param is None else param.shape[0])
        if param is None or (rows[1] - rows[0], *param.shape[1:]) != t.shape:
            raise SdStudioError(
                f"the LoRA was made for {lora.architecture}; this model has no weight {t.key} "
                f"{list(t.shape)} for {name}: attach it to the model it was made for"
            )


def _part_call(model: StableDiffusion, lora: TrainableLoRA, part: Part) -> nn.Module:
    module = model.unet if part == "unet" else model.text_encoder
    if not any(not t.path and t.module.target.part == part for t in lora.targets.values()):
        return module
    return _MergedCall(module, lambda: lora.merged_weights(module, part))


@contextlib.contextmanager
def attached(model: StableDiffusion, lora: TrainableLoRA) -> Iterator[AttachedLoRA]:
    """The model's forward with the LoRA's branches, for the body of the ``with``: forward hooks on the
    target modules (removed afterwards), the model's weights frozen (its ``requires_grad`` flags restored
    afterwards). Nothing of the model is written."""
    _check_fits(model, lora)
    if lora.attached_to is not None:
        raise SdStudioError(
            "this LoRA is already attached to a model; leave that `with attached(...)` block first"
        )
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    handles: list[Any] = []
    lora.attached_to = id(model)
    try:
        model.requires_grad_(False)
        handles.extend(_register_hooks(model, lora))
        unet = _part_call(model, lora, "unet")
        device = next(model.parameters()).device
        schedule = DiscreteSchedule.from_config(model.config.schedule).to(device)
        yield AttachedLoRA(
            model=model,
            lora=lora,
            unet=unet,
            text_encoder=_part_call(model, lora, "te"),
            denoiser=Denoiser(unet, schedule, model.config.prediction),
            hooks=handles,
        )
    finally:
        for handle in handles:
            handle.remove()
        lora.attached_to = None
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def param_groups(lora: TrainableLoRA, config: LoraTrainConfig | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups with kohya's separate learning rates (``prepare_optimizer_params``): the
    UNet's factors at ``unet_lr``, the text encoder's at ``text_lr``; a part with no factors has no group.
    Each group also has its ``name`` ("unet" / "text_encoder")."""
    config = config or lora.config
    groups = []
    for part, name, lr in (("unet", "unet", config.unet_lr), ("te", "text_encoder", config.text_lr)):
        params = [p for n in lora.names(part) for p in lora.factors(n).parameters()]  # type: ignore[arg-type]
        if params:
            groups.append({"params": params, "lr": lr, "name": name})
    return groups


def encode_training_captions(
    run: AttachedLoRA,
    tokenizer: ClipTokenizer,
    captions: Sequence[str],
    clip_skip: int | None = None,
    embeddings: EmbeddingDatabase | None = None,
    trained_words: bool = False,
) -> Tensor:
    """Plain captions (no attention syntax, as kohya reads them) as the UNet's context, in 77-token chunks
    as prompts are (``tokenize_attention`` / ``encode_padded``), through the text encoder with its branches;
    with a gradient only when the text encoder trains or ``trained_words`` (``embeddings`` holds vectors
    being trained: pivotal tuning). ``embeddings``: words the captions may use by name, as prompts do.
    ``clip_skip``: the model's default when None. [batch, 77 * chunks, width], float32"""
    config = run.model.config.text
    clip_skip = clip_skip or config.default_clip_skip
    per_text = [tokenize_attention([(caption, 1.0)], tokenizer, config, embeddings) for caption in captions]
    grad = contextlib.nullcontext() if run.lora.trains_text or trained_words else torch.no_grad()
    with grad:
        return encode_padded(run.text_encoder, tokenizer, config, per_text, clip_skip)


def lora_loss(
    run: AttachedLoRA,
    latents: Tensor,
    context: Tensor,
    generator: torch.Generator,
    *,
    snr_gamma: float = 0.0,
    noise_offset: float = 0.0,
    rows: Rows | None = None,
    teacher: Denoiser | None = None,
) -> Tensor:
    """One training loss (scalar): ``latents`` (scaled, as the UNet sees them) noised at timesteps drawn
    uniformly from the model's training timesteps (as kohya and diffusers draw them, here as their sigmas),
    denoised by the UNet with its branches against ``context`` (``encode_training_captions``), scored by the
    denoiser's own loss (eps or v as the model predicts; Min-SNR-gamma with ``snr_gamma`` > 0).

    ``noise_offset`` (kohya / diffusers ``--noise_offset``, after Guttenberg's "Diffusion with Offset
    Noise"): adds ``noise_offset * N(0, 1)`` per sample and channel to the noise, so that the model learns to
    change an image's mean brightness. Noise and timesteps come from ``generator`` (on the CPU, so a seed
    gives the same run on any device). ``rows``: this process's rows of a data-parallel global batch
    (``TrainingData.rows``; None alone). ``teacher``: its prediction is the target instead of the noise
    (``Denoiser.loss``; ``run.base()`` for prior preservation against the base)."""
    if context.shape[0] != latents.shape[0]:
        raise ValueError(f"{context.shape[0]} contexts for {latents.shape[0]} latents")
    return run.denoiser.training_loss(
        latents, context, generator, snr_gamma=snr_gamma, noise_offset=noise_offset, rows=rows, teacher=teacher
    ).mean()


def kohya_metadata(lora: TrainableLoRA, output_name: str) -> dict[str, str]:
    """The ``ss_*`` entries kohya's ``train_network.py`` writes that this LoRA determines (the network and
    the base model's version, as ``model_util.get_model_version_str_for_sd1_sd2``); the run's own (steps,
    seed, resolution, ...) come from the caller."""
    config = lora.config
    args = {}
    if config.conv_rank is not None and any(t.module.convolution for t in lora.targets.values()):
        args = {"conv_dim": str(config.conv_rank), "conv_alpha": str(config.locon_alpha)}
    filters = {"modules": list(config.modules), "skip_modules": list(config.skip_modules)}
    version = ("sd_v2" if lora.v2 else "sd_v1") + ("_v" if lora.prediction == "v" else "")
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.network_alpha),
        "ss_network_args": json.dumps(args),
        "ss_network_dropout": "None",
        "ss_unet_lr": str(config.unet_lr),
        "ss_text_encoder_lr": str(config.text_lr) if lora.trains_text else "None",
        "ss_v2": str(lora.v2),
        "ss_base_model_version": version,
        "ss_output_name": output_name,
        "ss_training_started_at": str(lora.created_at),
        "ss_training_finished_at": str(time.time()),
    } | ({"ss_sdstudio_module_filter": json.dumps(filters)} if config.modules or config.skip_modules else {})


def save_kohya(
    lora: TrainableLoRA,
    path: str | Path,
    metadata: Mapping[str, object] | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write the LoRA as kohya does (``LoRANetwork.save_weights``): its state dict, factors in ``dtype``
    (alphas stay float32, so the scale is the one trained with), the ``ss_*`` metadata (``kohya_metadata``,
    then the caller's ``metadata``, values as strings) and ``sshs_model_hash``, the sha256 of the tensor
    data (``hashes.addnet_hash``: A1111 shows its first 12 digits as the LoRA's hash). Atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SdStudioError(f"{path}: a kohya LoRA file ends in .safetensors")
    check_writable(path, "LoRA file")
    if path.exists() and not overwrite:
        raise SdStudioError(f"{path}: already exists; pass --overwrite to replace it")
    tensors = {
        key: value.detach().to("cpu", value.dtype if key.endswith(".alpha") else dtype).contiguous()
        for key, value in lora.state_dict().items()
    }
    header = kohya_metadata(lora, path.stem) | {k: str(v) for k, v in (metadata or {}).items()}
    header.pop("sshs_model_hash", None)

    def write(tmp: Path) -> None:
        # the data hash does not depend on the header: hash the first write, then write it in the header
        save_file(tensors, tmp, metadata=header)
        save_file(tensors, tmp, metadata=header | {"sshs_model_hash": addnet_hash(tmp)})

    atomic_write(path, write)
    log.info("wrote %d LoRA modules to %s", len(lora.targets), path)
    return path


@dataclass(frozen=True)
class LoraRunOptions(LoopOptions):
    """The loop options of a LoRA run (``finetune.LoopOptions``); the file is ``lora.safetensors`` unless named.
    ``prior``: regularisation images trained beside the instance images, as kohya's ``--reg_data_dir`` and
    diffusers' ``train_dreambooth_lora.py --with_prior_preservation`` do (``dreambooth.PriorPreservation``:
    class images made by the base model from a class prompt, or a folder of captioned images); what the
    LoRA learns is then kept off what the base model drew for them."""

    name: str = "lora"
    prior: PriorPreservation | None = None
    # Textual-inversion files the captions may name (A1111's --embeddings-dir): their vectors enter the text
    # encoder as at inference and stay as they are.
    embeddings: str | None = None
    # Pivotal tuning (diffusers' train_dreambooth_lora_sdxl_advanced.py --train_text_encoder_ti): a new word's
    # vectors (textual inversion, started from ``init_text``) trained together with the LoRA at ``pivotal_lr``
    # and written as ``embeddings/WORD.safetensors``; generation then needs both (--embeddings RUN/embeddings).
    pivotal: EmbeddingTrainConfig | None = None
    pivotal_lr: float = 5e-3


def train_lora(
    model: LoadedModel,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: LoraTrainConfig,
    run: RunConfig,
    options: LoraRunOptions = LoraRunOptions(),
    dataset_options: dict | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int, float], None] | None = None,
    preview: PreviewSettings | None = None,
) -> list[Path]:
    """A LoRA (LoCon with ``config.conv_rank``) trained on the captioned images in ``data``, in the shared loop
    (``trainer.train``: resumable, logged), with the model's own UNet, text encoder and denoiser loss; writes
    ``NAME.safetensors`` (kohya's format and ``ss_*`` metadata, ``save_kohya``) into ``out``.

    The model is not changed: the factors enter its forward pass through ``attached``. bf16 autocast only where
    the device runs bf16 natively (elsewhere it is emulated and slower than fp32). At each save it writes
    ``saves/NAME-STEP.safetensors`` (kohya's ``--save_every_n_steps``) and, with ``preview``, an image made
    with that file (``training.preview``). Under torchrun data-parallel: ``run.batch_size`` per process,
    rank 0 writes the files, every rank returns their paths."""
    out = Path(out)
    shard = shard_from_env(model.device)
    named = {"name": options.pivotal.name} if options.pivotal is not None else {}  # the template's [name]
    data_config = dataset_config_for(model, **(dataset_options or {}) | named)
    prior = options.prior
    if prior is not None:
        check_class_folder(prior, class_folder(prior, out))
    if options.embeddings is not None and not Path(options.embeddings).is_dir():
        raise SdStudioError(f"{options.embeddings}: no such folder of embeddings (--embeddings)")
    if options.pivotal is not None:  # a word no caption names would get no gradient
        check_names_embedding(scan_dataset(data, data_config), data_config, options.pivotal.name, data)
    settings = jsonable(
        {"method": "lora", "model": str(model.path), "data": str(data), "run": run_settings(run, shard),
         "lora": asdict(config), "options": asdict(options), "dataset": asdict(data_config)},
    )  # fmt: skip
    resume = prepare_run_folder(out, settings, overwrite, shard)
    log.info("%s %s", "resuming" if resume else "starting", out)
    source = TrainingData.open(
        data, data_config, model, out / "latents", run.batch_size, run.seed, shard=shard
    )
    classes = None  # the class images are the base model's: made before any branch is attached
    if prior is not None:
        classes = open_class_data(
            model, prior, out, data_config.resolution, run.batch_size, run.seed + 1, shard
        )
    sd = model.model
    lora = TrainableLoRA(sd, config, seed=run.seed)
    tokenizer = ClipTokenizer()
    words, embeddings = caption_words(model, options, tokenizer)
    bf16 = run.bf16 and bf16_native(model.device)
    if run.bf16 and not bf16:
        log.info("%s has no native bf16: training in fp32", model.device)
    train_config = options.train_config(run, bf16, lr=config.unet_lr)
    width, height = (
        (data_config.resolution,) * 2 if isinstance(data_config.resolution, int) else data_config.resolution
    )
    run_metadata: dict[str, object] = {  # kohya's train_network.py entries a run determines
        "ss_sd_model_name": model.name,
        "ss_sd_model_hash": model.short_hash,
        "ss_resolution": f"({width}, {height})",
        "ss_num_train_images": sum(item.repeats for item in source.dataset.items),
        "ss_num_reg_images": sum(item.repeats for item in classes.dataset.items) if classes else 0,
        "ss_prior_loss_weight": prior.prior_loss_weight if prior else 1.0,
        "ss_batch_size_per_device": run.batch_size,
        "ss_max_train_steps": run.steps,
        "ss_learning_rate": config.unet_lr,
        "ss_lr_scheduler": train_config.lr_schedule,
        "ss_lr_warmup_steps": run.warmup,
        "ss_gradient_accumulation_steps": options.gradient_accumulation,
        "ss_optimizer": "bitsandbytes.optim.AdamW8bit"
        if options.optimizer == "adamw8bit"
        else "torch.optim.AdamW",
        "ss_noise_offset": options.noise_offset,
        "ss_min_snr_gamma": run.snr_gamma or None,
        "ss_seed": run.seed,
        "ss_mixed_precision": "bf16" if bf16 else "no",
        "ss_save_precision": options.save_dtype,
        "ss_tag_frequency": json.dumps(_tag_frequency(source)),
    } | ({"ss_sdstudio_prior_target": prior.target} if prior else {})  # sdstudio's own: --prior-target
    with attached(sd, lora) as branches:
        teacher = branches.base() if prior is not None and prior.target == "base" else None

        def loss_fn(index: int, generator: torch.Generator) -> Tensor:
            latents, captions = source.batch(index, generator)
            context = encode_training_captions(branches, tokenizer, captions, embeddings=embeddings,
                                               trained_words=words is not None)  # fmt: skip
            instance = lora_loss(branches, latents, context, generator, snr_gamma=run.snr_gamma,
                                 noise_offset=options.noise_offset, rows=source.rows(index))  # fmt: skip
            if words is not None:  # a batch whose captions were all dropped: a zero gradient, every rank alike
                instance = instance + 0.0 * words.vectors.sum()
            if classes is None or prior is None:
                return instance
            class_latents, captions_of_class = classes.batch(index, generator)
            class_context = encode_training_captions(
                branches, tokenizer, class_captions(prior, captions_of_class), embeddings=embeddings,
                trained_words=words is not None,
            )
            kept = lora_loss(branches, class_latents, class_context, generator, snr_gamma=run.snr_gamma,
                             noise_offset=options.noise_offset, rows=classes.rows(index),
                             teacher=teacher)  # fmt: skip
            return prior_preservation_loss(instance, kept, prior.prior_loss_weight)

        def on_save(step: int) -> None:
            saved = out / SAVES_FOLDER / f"{saved_name(options.name, step)}.safetensors"
            saved.parent.mkdir(exist_ok=True)
            save_kohya(lora, saved, metadata(step), dtype=DTYPES[options.save_dtype], overwrite=True)
            if words is not None:
                save_embedding(words, saved.with_name(f"{saved_name(words.config.name, step)}.pt"), step=step,
                               overwrite=True)  # fmt: skip
            if preview is not None:
                with branches.suspended():  # the preview merges the saved file into the weights instead
                    render_preview(model, preview, out, step, options.name, "lora", saved, embeddings)

        def metadata(step: int) -> dict[str, object]:
            return run_metadata | {"ss_steps": step, "ss_epoch": -(-step * options.gradient_accumulation
                                                                    // source.batches_per_epoch)}  # fmt: skip

        groups = param_groups(lora)
        trained: nn.Module = lora
        if words is not None:
            groups.append({"params": [words.vectors], "lr": options.pivotal_lr, "name": "embedding"})
            trained = nn.ModuleDict({"lora": lora, "embedding": words})
        train(trained, loss_fn, train_config, out / "state", parameters=groups, progress=progress, shard=shard,
              on_save=on_save)  # fmt: skip
    paths = [out / f"{options.name}.safetensors"]
    if words is not None:
        paths.append(out / EMBEDDINGS_FOLDER / f"{words.config.name}.safetensors")
    if shard.main:
        save_kohya(lora, paths[0], metadata(run.steps), dtype=DTYPES[options.save_dtype], overwrite=True)
        if words is not None:
            paths[1].parent.mkdir(exist_ok=True)
            save_embedding(words, paths[1], step=run.steps, overwrite=True)
    shard.barrier()  # the files exist when any rank returns
    return paths


def caption_words(
    model: LoadedModel, options: LoraRunOptions, tokenizer: ClipTokenizer
) -> tuple[TrainableEmbedding | None, EmbeddingDatabase | None]:
    """The pivotal word being trained (started from its init text's token vectors) and the database of every
    word the captions may name: it, then the ``embeddings`` folder's (None when neither is asked for)."""
    words = None
    if options.pivotal is not None:
        words = TrainableEmbedding.create(options.pivotal, model.model.text_encoder.token_embedding, tokenizer)
    loaded = []
    if options.embeddings is not None:
        loaded = list(load_embeddings_for(options.embeddings, model.config, tokenizer).embeddings.values())
    if words is None and not loaded:
        return None, None
    mine = list(words.database.embeddings.values()) if words is not None else []
    return words, EmbeddingDatabase.build([*mine, *loaded], tokenizer)


def _tag_frequency(source: TrainingData) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per dataset folder, how often each comma-separated tag appears in the
    captions (A1111's LoRA card shows it)."""
    frequency: dict[str, dict[str, int]] = {}
    for item in source.dataset.items:
        folder = frequency.setdefault(str(Path(item.name).parent), {})
        for caption in item.captions[:1]:
            for tag in (t.strip() for t in caption.split(",")):
                if tag:
                    folder[tag] = folder.get(tag, 0) + 1
    return frequency
