"""AUTOMATIC1111 hypernetwork training (its Train > Hypernetwork tab): small MLPs per context width that
rewrite the keys' and values' input of every attention layer, learnt with the whole model frozen, written
as the ``.pt`` that ``<hypernet:NAME:MULT>`` (``sdstudio.adapters.hypernetwork``) and A1111 read.

Source: A1111 ``modules/hypernetworks/hypernetwork.py`` (``HypernetworkModule``, ``Hypernetwork.save``,
``parse_dropout_structure``, ``train_hypernetwork``) and ``modules/ui.py`` (the "Create hypernetwork"
defaults: modules 768, 320, 640, 1280; layer structure ``1, 2, 1``; activation ``linear``; initialisation
``Normal``; no layer norm, no dropout).

Layout (``HypernetworkModule.__init__``): for width ``dim``, an ``nn.Sequential`` named ``linear`` holding,
per step ``i`` of the layer structure, ``Linear(int(dim * ls[i]), int(dim * ls[i + 1]))``, the activation
(none for ``linear``, none after the last Linear unless ``activate_output``), a ``LayerNorm`` if
``is_layer_norm``, a ``Dropout`` if ``dropout_structure[i + 1] > 0``. Each module here is that Sequential
under that name, so its state dict is A1111's (``linear.0.weight``...) and the file is the state dicts as they
are. Its output is ``x + linear(x)``: A1111 multiplies by 1 while training (``self.multiplier if not
self.training else 1``). Dropout (and RReLU's random slope) act in training only.

Initialisation (``HypernetworkModule.__init__``): every Linear and LayerNorm weight, by the chosen rule:
``Normal`` N(0, 0.01) with the bias drawn from N(0, 0), i.e. zero; ``XavierUniform`` / ``XavierNormal``;
``KaimingUniform`` / ``KaimingNormal`` (nonlinearity ``leaky_relu`` for the ``leakyrelu`` activation, else
``relu``), biases zero. LayerNorms always take the ``Normal`` rule (weight N(0, 0.01), bias 0), as A1111's
``or type(layer) == torch.nn.LayerNorm`` says. Draws come from a generator seeded by the run's seed, in
A1111's order (widths, then k before v, then the Sequential's order, weight before bias).

Training (``train_hypernetwork``): captions through the frozen text encoder (no gradient), the frozen UNet
with the hypernetwork at every attention layer whose context width it has (self-attention included), the
denoiser's own loss (``Denoiser.loss``: eps or v, Min-SNR optional), AdamW with A1111's (torch's default)
weight decay 0.01, in the shared loop (``trainer.train``: it clips the gradient norm at 1, A1111 by
default does not), which resumes a killed run. Dropout draws from torch's global generator, so each step
seeds it from the step's own generator (saved with the run) and restores it after: a resumed run draws the
masks an unbroken one drew.

Learning rate: A1111's default for hypernetworks is 5e-6 (real models). On the embedded toy model (the
``outlined`` concept, 200 images, batch 8, 1500 steps) 1e-3 gave the lowest held-out loss (3e-4 close,
3e-3 too high), and a 10 % caption dropout (``caption_dropout_rate``) the best images at CFG 7: without
it the hypernetwork never sees the empty prompt, and guidance amplifies what it does to the unconditional
branch. That was an earlier embedded model; on the present one (decoder stage, 64 images, the base prompts'
figures measured too) every rate from 3e-5 to 1e-3 takes the base model's shapes apart before an outline
appears and 2e-5 changes nothing (BENCHMARKS.md, issue 22): the toy default is kept until a rate that works
is found. On that style even a full fine-tune of the toy UNet stops at about 54 % of prompts outlined.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sdstudio.adapters.hypernetwork import ACTIVATIONS
from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write
from sdstudio.models.configs import ModelConfig, TextEncoderConfig
from sdstudio.models.loading import LoadedModel
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.prompt.conditioning import encode_captions
from sdstudio.training.distributed import Rows, shard_from_env
from sdstudio.training.finetune import (
    Progress,
    RunConfig,
    TrainingData,
    dataset_config_for,
    jsonable,
    prepare_run_folder,
    run_settings,
    training_denoiser,
)
from sdstudio.training.preview import SAVES_FOLDER, PreviewSettings, render_preview, saved_name
from sdstudio.training.trainer import train

log = logging.getLogger(__name__)

__all__ = [
    "WEIGHT_INITIALIZATIONS",
    "HypernetworkTrainConfig",
    "TrainableHypernetwork",
    "TrainableHypernetworkModule",
    "TrainingHypernetworkStack",
    "hypernetwork_loss",
    "hypernetwork_widths",
    "train_hypernetwork",
]

WEIGHT_INITIALIZATIONS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
A1111_DROPOUT = 0.3  # parse_dropout_structure's probability
# A1111 HypernetworkModule.activation_dict: its own seven names, then torch.nn.modules.activation's classes
# by their lower-case names (only those sdstudio can apply at inference are offered).
_NAMED: Mapping[str, type[nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}  # fmt: skip
_NAME_CHARACTERS = "._- "  # A1111 create_hypernetwork keeps letters, digits and these


def _activation_class(name: str) -> type[nn.Module]:
    if name in _NAMED:
        return _NAMED[name]
    from torch.nn.modules import activation

    classes = {
        n.lower(): c for n, c in vars(activation).items() if isinstance(c, type) and issubclass(c, nn.Module)
    }
    return classes[name]


@dataclass(frozen=True)
class HypernetworkTrainConfig:
    """What A1111's "Create hypernetwork" asks, with its defaults.

    ``dropout_structure``: a probability per entry of ``layer_structure`` (first and last 0), used with
    ``use_dropout``; None with ``use_dropout``: A1111's ``parse_dropout_structure`` (0.3 after every Linear
    but the last two). ``widths``: the context widths to learn a pair of modules for; None: the model's
    (``hypernetwork_widths``: A1111's 768, 320, 640, 1280 for SD 1)."""

    name: str
    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation_func: str = "linear"
    weight_initialization: str = "Normal"
    is_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: tuple[float, ...] | None = None
    activate_output: bool = False
    widths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name.strip() or not all(c.isalnum() or c in _NAME_CHARACTERS for c in self.name):
            raise SdStudioError(
                f"hypernetwork name {self.name!r}: use letters, digits, spaces and ._- only (it names the file)"
            )
        ls = self.layer_structure
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1 or not all(v > 0 for v in ls):
            raise SdStudioError(
                f"layer structure {list(ls)}: positive sizes that start and end with 1, such as 1, 2, 1"
            )
        act = self.activation_func
        if act != "linear" and act not in ACTIVATIONS:
            raise SdStudioError(
                f"activation {act!r}: not one sdstudio can apply; choose linear, {', '.join(sorted(ACTIVATIONS))}"
            )
        if self.weight_initialization not in WEIGHT_INITIALIZATIONS:
            raise SdStudioError(
                f"weight initialization {self.weight_initialization!r}: choose {', '.join(WEIGHT_INITIALIZATIONS)}"
            )
        drop = self.dropout_structure
        if drop is not None:
            if not self.use_dropout:
                raise SdStudioError("a dropout structure was given without use_dropout: turn dropout on")
            if len(drop) != len(ls) or drop[0] != 0 or drop[-1] != 0 or not all(0 <= p < 1 for p in drop):
                raise SdStudioError(
                    f"dropout structure {list(drop)}: one probability (0 to below 1) per layer structure entry "
                    f"({len(ls)}), the first and the last 0, such as 0, 0.3, 0"
                )
        if self.widths is not None and (
            not self.widths
            or len(set(self.widths)) != len(self.widths)
            or not all(w > 0 for w in self.widths)
        ):
            raise SdStudioError(f"hypernetwork widths {list(self.widths)}: distinct positive context widths")

    @property
    def dropouts(self) -> tuple[float, ...]:
        """The dropout structure as A1111 builds it: ``create_hypernetwork`` zeros it without ``use_dropout``,
        and ``parse_dropout_structure`` (last_layer_dropout False) fills it when none is given."""
        n = len(self.layer_structure)
        if not self.use_dropout:
            return (0,) * n
        if self.dropout_structure is not None:
            return tuple(float(p) for p in self.dropout_structure)
        return (0, *[A1111_DROPOUT] * (n - 3), 0, 0)


def hypernetwork_widths(config: ModelConfig) -> tuple[int, ...]:
    """The context widths of the model's attention layers, as A1111's ``enable_sizes`` lists them: the
    text's (what cross-attention reads) first, then the self-attention widths, i.e. the channels of every
    UNet level with attention and of the middle block. SD 1: (768, 320, 640, 1280); SD 2: (1024, 320, ...)."""
    u = config.unet
    levels = [
        u.model_channels * m for level, m in enumerate(u.channel_mult) if 2**level in u.attention_resolutions
    ]
    unet = sorted({*levels, u.model_channels * u.channel_mult[-1]})
    return (u.context_dim, *(w for w in unet if w != u.context_dim))


class TrainableHypernetworkModule(nn.Module):
    """A1111's ``HypernetworkModule`` for one width: ``x + linear(x) * multiplier``."""

    def __init__(self, dim: int, config: HypernetworkTrainConfig) -> None:
        super().__init__()
        ls, drop, n = config.layer_structure, config.dropouts, len(config.layer_structure)
        modules: list[nn.Module] = []
        for i in range(n - 1):
            fan_in, out = int(dim * ls[i]), int(dim * ls[i + 1])
            if fan_in < 1 or out < 1:
                raise SdStudioError(
                    f"layer structure {list(ls)} gives width {dim} a layer of {min(fan_in, out)} features: use larger sizes"
                )
            # the weights are drawn by ``init_a1111`` from the run's generator, not torch's global one
            modules.append(torch.nn.utils.skip_init(nn.Linear, fan_in, out))
            if config.activation_func != "linear" and (i < n - 2 or config.activate_output):
                modules.append(_activation_class(config.activation_func)())
            if config.is_layer_norm:
                modules.append(nn.LayerNorm(out))
            if drop[i + 1] > 0:
                modules.append(nn.Dropout(p=drop[i + 1]))
        self.linear = nn.Sequential(*modules)

    def forward(self, x: Tensor, multiplier: float = 1.0) -> Tensor:
        return x + self.linear(x) * multiplier  # [..., dim]

    @torch.no_grad()
    def init_a1111(self, rule: str, activation: str, generator: torch.Generator) -> None:
        """A1111's initialisation of a new module (see the module docstring), drawn from ``generator``."""
        init = nn.init
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if type(layer) not in (nn.Linear, nn.LayerNorm):
                continue
            w, b = layer.weight, layer.bias
            if rule == "Normal" or type(layer) is nn.LayerNorm:
                init.normal_(w, mean=0.0, std=0.01, generator=generator)
                init.normal_(b, mean=0.0, std=0.0, generator=generator)  # zeros, drawn as A1111 draws them
                continue
            if rule == "XavierUniform":
                init.xavier_uniform_(w, generator=generator)
            elif rule == "XavierNormal":
                init.xavier_normal_(w, generator=generator)
            elif rule == "KaimingUniform":
                init.kaiming_uniform_(w, nonlinearity=nonlinearity, generator=generator)
            else:
                init.kaiming_normal_(w, nonlinearity=nonlinearity, generator=generator)
            init.zeros_(b)


@dataclass(frozen=True, eq=False)
class TrainingHypernetworkStack:
    """``HypernetworkStack``'s contract (``kv``) over a trainable hypernetwork's live modules, so the UNet's
    output is differentiable with respect to their parameters. Hashed and compared by identity."""

    pairs: Mapping[int, tuple[TrainableHypernetworkModule, TrainableHypernetworkModule]]
    multiplier: float = 1.0

    @property
    def widths(self) -> frozenset[int]:
        return frozenset(self.pairs)

    def kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """(context_k, context_v) for ``to_k`` / ``to_v``; context [batch, tokens, width], unchanged for a
        width the hypernetwork has no modules for."""
        pair = self.pairs.get(context.shape[-1])
        if pair is None:
            return context, context
        # A1111 (cond_cast_float / cond_cast_unet): the modules run in their own dtype, the UNet gets its own
        x = context.to(pair[0].linear[0].weight.dtype)
        return (
            pair[0](x, self.multiplier).to(context.dtype),
            pair[1](x, self.multiplier).to(context.dtype),
        )


class TrainableHypernetwork(nn.Module):
    """The modules being learnt: per width, the one for the keys and the one for the values.

    ``state_dict()`` keys are ``pairs.<width>.<0 keys | 1 values>.linear.<index>.<weight | bias>``; each module's
    own state dict is A1111's."""

    def __init__(self, config: HypernetworkTrainConfig, widths: Sequence[int]) -> None:
        """The layout only: its Linears are not initialised (``create`` does that; or ``load_state_dict``)."""
        super().__init__()
        self.config = config
        self.widths = tuple(widths)
        self.pairs = nn.ModuleDict(
            {
                str(w): nn.ModuleList(
                    [TrainableHypernetworkModule(w, config), TrainableHypernetworkModule(w, config)]
                )
                for w in widths
            }
        )

    @classmethod
    def create(
        cls, config: HypernetworkTrainConfig, widths: Sequence[int], seed: int = 0
    ) -> TrainableHypernetwork:
        """A new hypernetwork, initialised as A1111's "Create hypernetwork" does, reproducibly from ``seed``."""
        network = cls(config, widths)
        generator = torch.Generator().manual_seed(seed)
        for k, v in network.modules_by_width().values():
            for module in (k, v):
                module.init_a1111(config.weight_initialization, config.activation_func, generator)
        return network

    def modules_by_width(self) -> dict[int, tuple[TrainableHypernetworkModule, TrainableHypernetworkModule]]:
        return {w: (pair[0], pair[1]) for w, pair in zip(self.widths, self.pairs.values())}  # type: ignore[misc]

    @property
    def random(self) -> bool:
        """Whether its training forward draws random numbers (dropout, RReLU's slopes)."""
        return any(isinstance(m, (nn.Dropout, nn.RReLU)) for m in self.modules())

    def stack(self, multiplier: float = 1.0) -> TrainingHypernetworkStack:
        """What the UNet takes as ``hypernetworks=``: these modules at ``multiplier`` (1 in training, as A1111)."""
        return TrainingHypernetworkStack(self.modules_by_width(), multiplier)

    def a1111_state(
        self, *, step: int = 0, checkpoint_hash: str | None = None, checkpoint_name: str | None = None
    ) -> dict:
        """The dict A1111's ``Hypernetwork.save`` pickles: per width (k state, v state) as float32 CPU tensors,
        then its fields, in its order."""
        c = self.config

        def state(module: TrainableHypernetworkModule) -> OrderedDict:
            return OrderedDict((k, v.detach().float().cpu().clone()) for k, v in module.state_dict().items())

        data: dict = {w: (state(k), state(v)) for w, (k, v) in self.modules_by_width().items()}
        dropouts = list(c.dropouts)
        data.update({
            "step": step,
            "name": c.name,
            "layer_structure": [float(v) for v in c.layer_structure],  # as A1111 parses "1, 2, 1"
            "activation_func": c.activation_func,
            "is_layer_norm": c.is_layer_norm,
            "weight_initialization": c.weight_initialization,
            "sd_checkpoint": checkpoint_hash,
            "sd_checkpoint_name": checkpoint_name,
            "activate_output": c.activate_output,
            "use_dropout": c.use_dropout,
            "dropout_structure": dropouts,
            "last_layer_dropout": dropouts[-2] != 0,
            "optional_info": None,
        })  # fmt: skip
        return data

    def save_a1111(
        self,
        path: str | Path,
        step: int = 0,
        checkpoint_hash: str | None = None,
        checkpoint_name: str | None = None,
        *,
        overwrite: bool = False,
    ) -> Path:
        """Write A1111's hypernetwork ``.pt`` (``a1111_state``), atomically."""
        path = Path(path)
        if path.suffix.lower() != ".pt":
            raise SdStudioError(f"{path}: an AUTOMATIC1111 hypernetwork file ends in .pt")
        if path.exists() and not overwrite:
            raise SdStudioError(f"{path}: already exists; pass --overwrite to replace it")
        data = self.a1111_state(step=step, checkpoint_hash=checkpoint_hash, checkpoint_name=checkpoint_name)
        return atomic_write(path, lambda tmp: torch.save(data, tmp))


@contextlib.contextmanager
def _seeded_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global generators (which ``nn.Dropout`` and ``nn.RReLU`` draw from) seeded for one step and
    restored after it, so a resumed run draws what an unbroken one drew."""
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def hypernetwork_loss(
    network: TrainableHypernetwork,
    denoiser: Denoiser,
    text_encoder: nn.Module,
    tokenizer: ClipTokenizer,
    text_config: TextEncoderConfig,
    clip_skip: int,
    latents: Tensor,
    captions: Sequence[str],
    generator: torch.Generator,
    *,
    snr_gamma: float = 0.0,
    rows: Rows | None = None,
) -> Tensor:
    """One hypernetwork loss: captions through the frozen text encoder (no gradient), the frozen UNet with
    the hypernetwork (multiplier 1) denoising ``latents`` at random training timesteps. ``latents``: scaled,
    as the UNet sees them. ``rows``: this rank's rows of the global batch (data-parallel training;
    ``Denoiser.training_loss``); dropout masks are then drawn per rank (from a seed offset by the rank's first
    row, so ranks differ), alike in distribution to one process's, not equal. Scalar."""
    if len(captions) != latents.shape[0]:
        raise ValueError(f"{len(captions)} captions for {latents.shape[0]} latents")
    with torch.no_grad():
        context = encode_captions(text_encoder, tokenizer, text_config, captions, clip_skip)
    with_network = dataclasses.replace(denoiser, hypernetworks=network.stack())  # type: ignore[arg-type]
    if not (network.training and network.random):
        return with_network.training_loss(latents, context, generator, snr_gamma=snr_gamma, rows=rows).mean()
    seed = int(torch.randint(0, 2**62, (), generator=generator))  # dropout's masks, drawn before the noise
    with _seeded_randomness(seed + (rows.index[0] if rows is not None else 0), latents.device):
        return with_network.training_loss(latents, context, generator, snr_gamma=snr_gamma, rows=rows).mean()


def train_hypernetwork(
    model: LoadedModel,
    data: str | os.PathLike,
    out: str | os.PathLike,
    hypernetwork_config: HypernetworkTrainConfig,
    run: RunConfig,
    dataset_options: dict | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    preview: PreviewSettings | None = None,
) -> list[Path]:
    """A new hypernetwork trained on ``data``; writes ``NAME.pt`` (A1111's format) into ``out``, and at each
    save ``saves/NAME-STEP.pt`` (and with ``preview`` its preview image, ``training.preview``).

    Captions as A1111's: an image without a caption file is captioned by its file name; a template
    (``dataset_options["template"]``, e.g. ``style_filewords``) has ``[name]`` replaced by the name.

    Under torchrun it trains data-parallel (``sdstudio.training.distributed``): ``run.batch_size`` per
    process, rank 0 writes the files, every rank returns their paths."""
    out = Path(out)
    shard = shard_from_env(model.device)
    config = hypernetwork_config
    options = {"missing_caption": "filename", **(dataset_options or {})}  # A1111 captions by file name
    dataset = dataset_config_for(model, **options, name=config.name)
    widths = config.widths or hypernetwork_widths(model.config)
    unused = sorted(set(widths) - set(hypernetwork_widths(model.config)))
    if unused and shard.main:
        log.warning("no attention layer of %s reads a context of width %s: those modules will not train",
                    model.name, ", ".join(map(str, unused)))  # fmt: skip
    settings = jsonable(
        {"method": "hypernetwork", "model": str(model.path), "data": str(data),
         "run": run_settings(run, shard),
         "hypernetwork": asdict(config), "widths": list(widths), "dataset": asdict(dataset)},
    )  # fmt: skip
    resume = prepare_run_folder(out, settings, overwrite, shard)
    log.info("%s %s", "resuming" if resume else "starting", out)
    tokenizer = ClipTokenizer()
    source = TrainingData.open(data, dataset, model, out / "latents", run.batch_size, run.seed, shard=shard)
    sd = model.model
    sd.requires_grad_(False)
    network = TrainableHypernetwork.create(config, widths, seed=run.seed).to(model.device)
    denoiser = training_denoiser(model)
    clip_skip = model.config.text.default_clip_skip

    def loss_fn(step: int, generator: torch.Generator) -> Tensor:
        latents, captions = source.batch(step, generator)
        return hypernetwork_loss(network, denoiser, sd.text_encoder, tokenizer, model.config.text, clip_skip,
                                 latents, captions, generator, snr_gamma=run.snr_gamma,
                                 rows=source.rows(step))  # fmt: skip

    def on_save(step: int) -> None:  # A1111's "Save a copy of the hypernetwork every N steps", and a preview
        saved = out / SAVES_FOLDER / f"{saved_name(config.name, step)}.pt"
        saved.parent.mkdir(exist_ok=True)
        network.save_a1111(saved, step, model.short_hash, model.name, overwrite=True)
        if preview is not None:
            render_preview(model, preview, out, step, config.name, "hypernetwork", saved)

    # A1111 trains with torch.optim.AdamW's defaults: weight decay 0.01
    train(network, loss_fn, run.train_config(weight_decay=0.01), out / "state", progress=progress, shard=shard,
          on_save=on_save)  # fmt: skip
    path = out / f"{config.name}.pt"
    if shard.main:
        network.save_a1111(path, run.steps, model.short_hash, model.name, overwrite=True)
    shard.barrier()  # the file exists when any rank returns
    return [path]
