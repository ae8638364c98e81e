"""The embedded default model's recipe: train all three networks of a small Stable Diffusion from scratch
on the toyworld, with the project's own trainer, models and denoiser.

Stages (each resumable, each can be run alone in order):
1. ``vae``: KL autoencoder, 64x64x3 -> 8x8x4, on whole images: squared error with object pixels
   weighted up (objects cover a few percent of an image; unweighted, the VAE first learns backgrounds
   only), small objects more, gradient-L1 for sharp edges, a small KL; the posterior starts narrow
   (log-variance -8) so sampling noise does not drown the latents while the encoder is still weak.
   Then the scale factor 1/std(latents).
2. ``text``: the SD 1.x text transformer at small width, trained contrastively (symmetric InfoNCE,
   learned temperature) against a small image encoder on caption-image pairs; then frozen.
3. ``latents``: a fixed set of training scenes encoded once by the VAE (mean and std kept, sampled anew
   each time a scene is used).
4. ``unet``: epsilon prediction on SD's noise schedule through ``Denoiser.loss`` (the sampler's own
   parametrisation) weighted by Min-SNR-gamma, captions re-drawn each time, 10 % caption dropout for
   classifier-free guidance, EMA weights shipped.
5. ``decoder``: the VAE's decoder alone (the encoder frozen, so the latent space the UNet learnt stays as
   it is) trained further on the base scenes and, a share ``decoder_concept_share`` of each batch, on
   renders of the fine-tuning concepts (``concepts.py``: ring, pink, outlined), which the text encoder
   and the UNet never see. A real SD VAE has seen every colour and shape; the toy one had not, and
   decoded pink as nothing the judge reads (0 %), so no fine-tuning method could be measured on it.
   Any finished model can get this stage alone (``run_recipe(..., start=MODEL)``).
6. ``clip``: the image side of the toy CLIP pair (``clip_pair.py``): a copy of the image encoder and a
   contrastive head trained against the frozen text encoder, so that the pair ranks captions against
   images as CLIP does (the captioner's default), then trained further on more two-object scenes
   (``clip_refine``). The model and the FID image encoder are unchanged.

Every model file the recipe saves says in its header what it was trained on (``TRAINED_ON``: the
captions' words and the 64x64 image size), so generation can warn about prompts and sizes outside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sdstudio.diffusion.denoiser import Denoiser
from sdstudio.diffusion.schedule import DiscreteSchedule
from sdstudio.errors import SdStudioError
from sdstudio.io.files import atomic_write, write_text_atomic
from sdstudio.models.configs import METADATA_KEY, PRESETS, ModelConfig, TrainedOn
from sdstudio.models.loading import load_model, save_model
from sdstudio.models.stablediffusion import StableDiffusion, random_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.prompt.conditioning import chunk_tokens
from sdstudio.toyworld import judge, language, world
from sdstudio.training.contrastive import ContrastiveHead, ImageEncoder, pooled_text
from sdstudio.training.trainer import TrainConfig, train

log = logging.getLogger(__name__)

STAGES = ("vae", "text", "latents", "unet", "decoder", "clip")
WORK_MODEL = "model.safetensors"  # fp32, the latest finished stage
FINAL_MODEL = "toyworld.safetensors"  # fp16, EMA UNet: what ships
IMAGE_ENCODER = "image_encoder.safetensors"
CLIP_PAIR = "clip_pair.safetensors"
LATENTS = "latents.pt"
RECIPE = "recipe.json"

# What the recipe trains every model on: captions in the world's language only, 64x64 images only.
TRAINED_ON = TrainedOn(
    vocabulary=tuple(sorted(language.CAPTION_VOCABULARY)),
    sizes=((world.IMAGE_SIZE, world.IMAGE_SIZE),),
)


@dataclass(frozen=True)
class ToyRecipe:
    seed: int = 0
    config: ModelConfig = field(
        default_factory=lambda: dataclasses.replace(PRESETS["toyworld"], trained_on=TRAINED_ON)
    )
    vae: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=3200, lr=2e-3, warmup=100, bf16=False, checkpoint_every=250)
    )
    vae_batch: int = 16
    kl_weight: float = 1e-6
    grad_weight: float = 1.0
    object_weight: float = 9.0  # extra weight of the squared error on pixels that are not background
    # Factor on ``object_weight`` over small objects, whose few pixels carry the whole shape (at 1.0 the
    # VAE decoded small stars and crosses of some colours as diamonds)
    small_object_weight: float = 3.0
    vae_initial_logvar: float = -8.0
    # The judge must still see the scene in this fraction of VAE reconstructions, or the run stops: a VAE
    # that paints backgrounds only (seen: L1 on 32x32 crops, 1400 steps) dooms the UNet stage that follows.
    vae_min_judge: float = 0.5
    # bf16 autocast makes a step ~20 % faster, which pays for 1000 steps instead of 700: with hard
    # negatives the encoder must also learn relations, and at 700 it kept sizes and shapes less apart.
    text: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=1000, lr=1e-3, warmup=100, bf16=True, checkpoint_every=250)
    )
    text_batch: int = 256
    # Share of each text batch that is hard negatives: two-object scenes of the batch again with their
    # objects' places swapped (world.swap_places). Without them no batch needs the relation to tell its
    # scenes apart, and the text encoder gave "above" and "below" the same embedding.
    text_hard_negatives: float = 0.25
    latent_scenes: int = 20000
    unet: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=6300, lr=1e-3, warmup=200, bf16=False, ema_decay=0.999, ema_start=2700, checkpoint_every=250
        )
    )
    unet_batch: int = 64
    caption_dropout: float = 0.1
    p_two_objects: float = 0.5
    snr_gamma: float = 5.0  # Min-SNR-gamma weighting of the UNet loss (0: plain eps MSE)
    text_bf16: bool = True  # the UNet stage's (frozen) text contexts under bf16 autocast
    # Share of two-object scenes in the UNet's batches, drawn from the encoded scenes (None: as encoded,
    # p_two_objects)
    unet_p_two_objects: float | None = 0.6
    # 600 steps at a constant 2e-4 took the judge's reading of VAE round trips of ring / pink / outlined
    # renders from 67 / 0 / 10 % to 98 / 100 / 90 % (seen combinations), base scenes' shapes 98.7 -> 97.3 %
    decoder: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=600, lr=2e-4, warmup=0, cosine=False, bf16=False, checkpoint_every=100)
    )
    decoder_concept_share: float = 0.4
    # A head alone on the frozen encoders read shapes at 94 % (a linear probe of the FID encoder's
    # features: 93.9 %), so the stage fine-tunes a copy of the image encoder with it
    clip: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=3200, lr=1e-3, warmup=50, weight_decay=0.0, checkpoint_every=100)
    )
    clip_batch: int = 256
    # The pair's text side pools all token states (contrastive.TextPool), and a share of each batch is
    # two-object scenes again with their shapes exchanged: with the EOS state alone and place swaps only,
    # the pair read two-object shapes right 56.6 % of the time, the right shapes on the wrong objects; with
    # them 79.1 % after 800 steps, 85.0 % after 1600, 89.8 % after 3200 (the clip TrainConfig above;
    # BENCHMARKS.md).
    clip_text_pool: bool = True
    clip_shape_swaps: float = 0.25
    # Then the pair trained further at a fifth of the rate on batches of 70 % two-object scenes (a scene
    # stream of its own, CLIP_REFINE_STREAM): two-object shapes 94.1 -> 95.5 % (BENCHMARKS.md). None: no
    # second phase.
    clip_refine: TrainConfig | None = field(
        default_factory=lambda: TrainConfig(steps=800, lr=2e-4, warmup=20, weight_decay=0.0, checkpoint_every=100)
    )
    clip_refine_p_two: float = 0.7

    @classmethod
    def smoke(cls) -> ToyRecipe:
        """A few steps of each stage: checks the plumbing, not the quality."""
        quick = {"warmup": 2, "bf16": False, "checkpoint_every": 3, "log_every": 1}
        return cls(
            vae=TrainConfig(steps=6, lr=1e-3, **quick),
            vae_batch=4,
            vae_min_judge=0.0,
            text=TrainConfig(steps=6, lr=1e-3, **quick),
            text_batch=8,
            latent_scenes=32,
            unet=TrainConfig(steps=6, lr=1e-3, ema_decay=0.9, ema_start=2, **quick),
            unet_batch=8,
            decoder=TrainConfig(steps=6, lr=1e-3, **quick),
            clip=TrainConfig(steps=6, lr=1e-3, **quick),
            clip_batch=8,
            clip_refine=TrainConfig(steps=3, lr=1e-3, **quick),
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)


Progress = Callable[[str, int, int, float], None]  # stage, step, total, smoothed loss


CLIP_REFINE_STREAM = 99  # the clip stage's second phase draws its scenes from [seed, 99, step]


def _rng(seed: int, stage: str, step: int) -> np.random.Generator:
    """Scene randomness as a pure function of (seed, stage, step), so a resumed run sees the same data."""
    return np.random.default_rng([seed, STAGES.index(stage), step])


def _scenes(rng: np.random.Generator, n: int, p_two: float) -> list[world.Scene]:
    return [world.sample_scene(rng, "train", 2 if rng.random() < p_two else 1) for _ in range(n)]


def text_batch_scenes(rng: np.random.Generator, n: int, p_two: float, hard_negatives: float) -> list[world.Scene]:
    """``n`` scenes for a contrastive batch: ``round(hard_negatives * n)`` of them are two-object scenes
    of the rest with their places swapped (fewer if the rest has fewer two-object scenes)."""
    twins = round(hard_negatives * n)
    scenes = _scenes(rng, n - twins, p_two)
    return scenes + [world.swap_places(s) for s in scenes if len(s.objects) == 2][:twins]


def _images(scenes: list[world.Scene]) -> torch.Tensor:
    """[B, 3, 64, 64] float32 in [-1, 1]."""
    arr = np.stack([world.render(s) for s in scenes]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _tokens(
    captions: list[str], config: ModelConfig, tokenizer: ClipTokenizer, cache: dict[str, list[int]] | None = None
) -> torch.Tensor:
    """[B, 77] ids framed exactly as inference frames a one-chunk prompt; ``cache`` memoises per caption
    (the world's captions repeat, and tokenizing in Python costs as much as a small training step)."""
    cache = {} if cache is None else cache
    for c in captions:
        if c not in cache:
            cache[c] = chunk_tokens(tokenizer.encode(c), config.text)[0]
    return torch.tensor([cache[c] for c in captions])


def _finite_diff_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the images' horizontal and vertical differences: sharpens edges."""
    d = a - b
    return (d[..., :, 1:] - d[..., :, :-1]).abs().mean() + (d[..., 1:, :] - d[..., :-1, :]).abs().mean()


def _object_weights(scenes: list[world.Scene], x: torch.Tensor, extra: float, small: float = 1.0) -> torch.Tensor:
    """[B, 1, H, W]: 1 on background pixels, 1 + ``extra`` where the image differs from its background,
    1 + ``small`` * ``extra`` there on small objects."""
    bg = torch.tensor([world.BACKGROUNDS[s.background] for s in scenes], dtype=x.dtype) / 127.5 - 1
    differs = ((x - bg[:, :, None, None]).abs().amax(1, keepdim=True) > 0.05).to(x.dtype)
    if small != 1.0:
        empty = np.zeros((world.IMAGE_SIZE, world.IMAGE_SIZE), dtype=np.float32)
        covered = np.stack([sum((world.object_alpha(o) for o in s.objects if o.size == "small"), empty) > 0 for s in scenes])
        differs = differs * (1 + (small - 1) * torch.from_numpy(covered)[:, None].to(x.dtype))
    return 1 + extra * differs


@torch.no_grad()
def narrow_posterior_(vae: torch.nn.Module, logvar: float) -> None:
    """Make the encoder's log-variance ``logvar`` for every input (its half of ``quant_conv``)."""
    e = vae.config.embed_dim
    vae.quant_conv.weight[e:].zero_()
    vae.quant_conv.bias[e:].fill_(logvar)


def train_vae(recipe: ToyRecipe, model: StableDiffusion, out: Path, progress: Progress) -> None:
    vae = model.first_stage_model.requires_grad_(True)
    narrow_posterior_(vae, recipe.vae_initial_logvar)  # a resumed stage replaces it with its checkpoint

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        rng = _rng(recipe.seed, "vae", step)
        scenes = _scenes(rng, recipe.vae_batch, recipe.p_two_objects)
        x = _images(scenes)
        dist = vae.encode(x)
        recon = vae.decode(dist.sample(torch.randn(dist.mean.shape, generator=gen)))
        kl = 0.5 * (dist.mean.pow(2) + dist.logvar.exp() - 1 - dist.logvar).flatten(1).sum(1).mean()
        weights = _object_weights(scenes, x, recipe.object_weight, recipe.small_object_weight)
        weighted = ((recon - x).pow(2) * weights).mean()
        return weighted + recipe.grad_weight * _finite_diff_l1(recon, x) + recipe.kl_weight * kl

    train(vae, loss_fn, recipe.vae, out / "vae", progress=lambda s, l: progress("vae", s, recipe.vae.steps, l))
    vae.requires_grad_(False).eval()


@torch.no_grad()
def latent_scale(recipe: ToyRecipe, model: StableDiffusion, n: int = 512) -> float:
    """LDM's scale factor: 1 / std of the latents, so the diffusion sees unit-variance data."""
    x = _images(_scenes(_rng(recipe.seed, "latents", 1), n, recipe.p_two_objects))
    z = torch.cat([model.first_stage_model.encode(b).mean for b in x.split(64)])
    return float(1 / z.std())


@torch.no_grad()
def vae_check(recipe: ToyRecipe, model: StableDiffusion, n: int = 64) -> dict[str, float]:
    """Reconstruct unseen renders: PSNR (dB, mean over images) and how often the judge still sees the scene."""
    scenes = _scenes(_rng(recipe.seed, "latents", 2), n, recipe.p_two_objects)
    x = _images(scenes)
    vae = model.first_stage_model
    recon = torch.cat([vae.decode(vae.encode(b).mode()) for b in x.split(32)])
    recon_u8, x_u8 = ((recon.clamp(-1, 1) + 1) * 127.5).round(), ((x + 1) * 127.5).round()
    mse = (recon_u8 - x_u8).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    images = recon_u8.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    seen = sum(judge.score(img, scene).all for img, scene in zip(images, scenes))
    return {"psnr_db": float((10 * torch.log10(255**2 / mse)).mean()), "judge_all": seen / n}


def train_text(recipe: ToyRecipe, model: StableDiffusion, out: Path, progress: Progress) -> ImageEncoder:
    text_encoder = model.cond_stage_model.requires_grad_(True)
    width = recipe.config.text.width
    with torch.random.fork_rng():  # initial weights from the seed alone, whatever earlier stages drew
        torch.manual_seed(recipe.seed)
        image_encoder = ImageEncoder(width)
        head = ContrastiveHead(width, width)
    modules = torch.nn.ModuleDict({"text": text_encoder, "image": image_encoder, "head": head})
    tokenizer = ClipTokenizer()

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        rng = _rng(recipe.seed, "text", step)
        scenes = text_batch_scenes(rng, recipe.text_batch, recipe.p_two_objects, recipe.text_hard_negatives)
        tokens = _tokens([world.caption(s, rng) for s in scenes], recipe.config, tokenizer)
        # Causal attention: positions up to the last EOS do not depend on what follows, so the
        # padding can be cut off for this objective without changing any embedding it uses.
        length = int((tokens == ClipTokenizer.EOS).int().argmax(dim=1).max()) + 1
        tokens = tokens[:, :length]
        hidden = text_encoder(tokens, 1)
        loss, _ = head(pooled_text(hidden, tokens), image_encoder(_images(scenes)))
        return loss

    train(modules, loss_fn, recipe.text, out / "text", progress=lambda s, l: progress("text", s, recipe.text.steps, l))
    text_encoder.requires_grad_(False).eval()
    image_encoder.requires_grad_(False).eval()
    return image_encoder


@torch.no_grad()
def encode_latents(recipe: ToyRecipe, model: StableDiffusion, out: Path, progress: Progress) -> None:
    rng = _rng(recipe.seed, "latents", 0)
    scenes = _scenes(rng, recipe.latent_scenes, recipe.p_two_objects)
    means, stds = [], []
    vae = model.first_stage_model
    for i in range(0, len(scenes), 256):
        dist = vae.encode(_images(scenes[i : i + 256]))
        means.append(dist.mean)
        stds.append(dist.std)
        progress("latents", min(i + 256, len(scenes)), len(scenes), 0.0)
    seeds = [int(v) for v in rng.integers(0, 2**31, size=len(scenes))]
    torch.save(
        {"mean": torch.cat(means), "std": torch.cat(stds), "caption_seeds": torch.tensor(seeds),
         "scenes": json.dumps([dataclasses.asdict(s) for s in scenes])},
        out / LATENTS,
    )


def _scene_from_dict(d: dict) -> world.Scene:
    objects = tuple(world.ObjectSpec(**o) for o in d["objects"])
    return world.Scene(objects=objects, background=d["background"], relation=d["relation"])


def unet_batch_indices(rng: np.random.Generator, counts: np.ndarray, n: int, p_two: float | None) -> np.ndarray:
    """``n`` indices into the encoded scenes (``counts``: objects per scene), uniform when ``p_two`` is
    None, else each a two-object scene with probability ``p_two``."""
    if p_two is None:
        return rng.integers(0, len(counts), size=n)
    one, two = np.flatnonzero(counts == 1), np.flatnonzero(counts == 2)
    return np.where(rng.random(n) < p_two, rng.choice(two, n), rng.choice(one, n))


def train_unet(recipe: ToyRecipe, model: StableDiffusion, out: Path, progress: Progress) -> None:
    data = torch.load(out / LATENTS, weights_only=True)
    means, stds = data["mean"], data["std"]
    scenes = [_scene_from_dict(d) for d in json.loads(data["scenes"])]
    config = model.config
    scale = config.vae.scale_factor
    unet = model.model.diffusion_model.requires_grad_(True)
    denoiser = Denoiser(unet, DiscreteSchedule.from_config(config.schedule), config.prediction)
    sigmas = denoiser.schedule.sigmas
    tokenizer = ClipTokenizer()
    text_encoder = model.cond_stage_model
    token_cache: dict[str, list[int]] = {}

    counts = np.array([len(s.objects) for s in scenes])

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        rng = _rng(recipe.seed, "unet", step)
        idx = unet_batch_indices(rng, counts, recipe.unet_batch, recipe.unet_p_two_objects)
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        captions = ["" if rng.random() < recipe.caption_dropout else world.caption(scenes[i], rng) for i in idx]
        tokens = _tokens(captions, config, tokenizer, token_cache)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.text_bf16):
            context = text_encoder(tokens, config.text.default_clip_skip).float()
        t = torch.randint(0, len(sigmas), (recipe.unet_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        return denoiser.loss(x0, noise, sigmas[t], context, snr_gamma=recipe.snr_gamma).mean()

    _, ema = train(unet, loss_fn, recipe.unet, out / "unet", progress=lambda s, l: progress("unet", s, recipe.unet.steps, l))
    if ema is not None:
        ema.copy_to(unet)
    unet.requires_grad_(False).eval()


def _decoder_scenes(recipe: ToyRecipe, rng: np.random.Generator) -> list[world.Scene]:
    """A decoder batch: base scenes, each replaced with probability ``decoder_concept_share`` by one object
    showing a concept, from either of its splits (the decoder must draw them all)."""
    from sdstudio.toyworld.concepts import CONCEPTS, SPLITS, sample_concept_scene

    concepts = list(CONCEPTS.values())
    scenes = _scenes(rng, recipe.vae_batch, recipe.p_two_objects)
    for i in range(len(scenes)):
        if rng.random() < recipe.decoder_concept_share:
            concept = concepts[int(rng.integers(len(concepts)))]
            scenes[i] = sample_concept_scene(concept, rng, SPLITS[int(rng.integers(len(SPLITS)))])
    return scenes


def train_decoder(recipe: ToyRecipe, model: StableDiffusion, out: Path, progress: Progress) -> None:
    """The ``decoder`` stage: the reconstruction loss of ``train_vae`` (without the KL term, which only
    the encoder feels) on ``_decoder_scenes``, through the frozen encoder's posterior samples."""
    vae = model.first_stage_model.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        scenes = _decoder_scenes(recipe, _rng(recipe.seed, "decoder", step))
        x = _images(scenes)
        with torch.no_grad():
            dist = vae.encode(x)
            z = dist.sample(torch.randn(dist.mean.shape, generator=gen))
        recon = vae.decode(z)
        weights = _object_weights(scenes, x, recipe.object_weight, recipe.small_object_weight)
        return ((recon - x).pow(2) * weights).mean() + recipe.grad_weight * _finite_diff_l1(recon, x)

    train(vae, loss_fn, recipe.decoder, out / "decoder", parameters=params,
          progress=lambda s, l: progress("decoder", s, recipe.decoder.steps, l))  # fmt: skip
    vae.requires_grad_(False).eval()


@torch.no_grad()
def concept_check(model: StableDiffusion, n: int = 48, seed: int = 77) -> dict[str, float]:
    """How often the judge reads each concept in VAE round trips (posterior mean) of ``n`` renders of each
    concept split: the most any fine-tuning method that keeps this VAE can reach."""
    from sdstudio.toyworld.concepts import CONCEPTS, SPLITS, sample_concept_scene

    vae = model.first_stage_model
    result = {}
    for k, (name, concept) in enumerate(CONCEPTS.items()):
        for j, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, k, j])
            scenes = [sample_concept_scene(concept, rng, split) for _ in range(n)]
            recon = vae.decode(vae.encode(_images(scenes)).mean).clamp(-1, 1)
            images = ((recon + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            found = 0
            for img, scene in zip(images, scenes):
                (obj,) = judge.score(img, scene).per_object
                found += bool(obj.found and getattr(obj, concept.kind))
            result[f"{name}/{split}"] = found / n
    return result


def train_clip(recipe: ToyRecipe, model: StableDiffusion, out: Path, progress: Progress) -> None:
    """The ``clip`` stage: ``clip_pair.train_pair`` on the model's text encoder and a copy of the run's
    image encoder, written to ``CLIP_PAIR``."""
    from sdstudio.toyworld.clip_pair import save_pair, train_pair

    encoder = load_image_encoder(out / IMAGE_ENCODER, width=recipe.config.text.width)
    encoder, head = train_pair(
        model.cond_stage_model, model.config, encoder, recipe.clip, out / "clip",
        seed=recipe.seed, batch=recipe.clip_batch, p_two=recipe.p_two_objects,
        hard_negatives=recipe.text_hard_negatives, shape_swaps=recipe.clip_shape_swaps,
        text_pool=recipe.clip_text_pool, scene_rng=lambda step: _rng(recipe.seed, "clip", step),
        progress=lambda s, l: progress("clip", s, recipe.clip.steps, l),
    )  # fmt: skip
    refine = recipe.clip_refine
    if refine is not None:
        encoder, head = train_pair(
            model.cond_stage_model, model.config, encoder, refine, out / "clip_refine",
            seed=recipe.seed, batch=recipe.clip_batch, p_two=recipe.clip_refine_p_two,
            hard_negatives=recipe.text_hard_negatives, shape_swaps=recipe.clip_shape_swaps,
            scene_rng=lambda step: np.random.default_rng([recipe.seed, CLIP_REFINE_STREAM, step]),
            progress=lambda s, l: progress("clip refine", s, refine.steps, l), head=head,
        )  # fmt: skip
    save_pair(encoder, head, out / CLIP_PAIR)


def _check_out_dir(out: Path, recipe: ToyRecipe) -> None:
    marker = out / RECIPE
    if marker.exists():
        if marker.read_text() != recipe.to_json():
            raise SdStudioError(
                f"{out}: holds a run of a different recipe ({RECIPE} differs); use another --out folder"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise SdStudioError(f"{out}: is not empty and holds no toyworld run to resume; use an empty or new folder")
    write_text_atomic(marker, recipe.to_json())


def _done(out: Path) -> list[str]:
    path = out / "stages.json"
    return json.loads(path.read_text()) if path.exists() else []


def _mark_done(out: Path, stage: str) -> None:
    write_text_atomic(out / "stages.json", json.dumps([*_done(out), stage]))


def run_recipe(
    out_dir: str | os.PathLike,
    recipe: ToyRecipe | None = None,
    stages: tuple[str, ...] = STAGES,
    progress: Progress | None = None,
    start: str | os.PathLike | None = None,
) -> Path:
    """Run (or resume) the recipe's stages into ``out_dir``; returns the shipped fp16 checkpoint's path.
    ``start``: a finished model of this recipe (the shipped one) to run the later stages on: the stages
    before the first of ``stages`` count as done with it (a new run folder only); its image encoder is
    the ``<stem>_image_encoder.safetensors`` beside it."""
    recipe = recipe or ToyRecipe()
    out = Path(out_dir)
    fresh = not (out / RECIPE).exists()
    _check_out_dir(out, recipe)
    if start is not None:
        if not fresh:
            raise SdStudioError(f"{out}: already holds a run; run again without --from to resume it, or give a new folder")
        first = min((STAGES.index(s) for s in stages if s in STAGES), default=len(STAGES))
        base = load_model(start, dtype=torch.float32).model
        save_model(base, out / WORK_MODEL, dtype=None, overwrite=True)
        # the run's image encoder: the one beside the model (shipped: toyworld_image_encoder.safetensors;
        # in a run folder: image_encoder.safetensors)
        beside = [Path(start).with_name(f"{Path(start).stem}_image_encoder.safetensors"), Path(start).with_name(IMAGE_ENCODER)]
        encoder = next((p for p in beside if p.is_file()), None)
        if encoder is not None:
            shutil.copyfile(encoder, out / IMAGE_ENCODER)
        elif "clip" in stages:
            raise SdStudioError(f"the clip stage needs the image encoder trained with {start} beside it "
                                f"({beside[0].name} or {beside[1].name})")  # fmt: skip
        write_text_atomic(out / "stages.json", json.dumps(list(STAGES[:first])))
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SdStudioError(f"unknown stage(s) {sorted(unknown)}; stages are: {', '.join(STAGES)}")
    if progress is None:
        bars: dict[str, tqdm] = {}

        def progress(stage: str, step: int, total: int, loss: float) -> None:
            bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, leave=True))
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}", refresh=True)

    torch.manual_seed(recipe.seed)
    work = out / WORK_MODEL
    model = load_model(work).model if work.exists() else random_model(recipe.config, seed=recipe.seed)
    # Whatever the config says (a run begun before headers carried it, a custom config), this is the data.
    model.config = dataclasses.replace(model.config, trained_on=TRAINED_ON)
    for stage in STAGES:
        if stage not in stages or stage in _done(out):
            continue
        missing = [s for s in STAGES[: STAGES.index(stage)] if s not in _done(out)]
        if missing:
            raise SdStudioError(f"stage {stage!r} needs {', '.join(missing)} first")
        log.info("toyworld: stage %s", stage)
        if stage == "vae":
            train_vae(recipe, model, out, progress)
            scaled = dataclasses.replace(model.config.vae, scale_factor=latent_scale(recipe, model))
            model.config = dataclasses.replace(model.config, vae=scaled)
            check = vae_check(recipe, model)
            write_text_atomic(out / "vae_check.json", json.dumps(check))
            log.info("toyworld: VAE reconstruction PSNR %.1f dB, judge sees %.0f%%", check["psnr_db"], 100 * check["judge_all"])
            if check["judge_all"] < recipe.vae_min_judge:
                raise SdStudioError(
                    f"the VAE loses the scenes (judge sees {check['judge_all']:.0%} of reconstructions, "
                    f"PSNR {check['psnr_db']:.1f} dB); train it longer or change the recipe before the UNet stage"
                )
        elif stage == "text":
            image_encoder = train_text(recipe, model, out, progress)
            save_file({k: v.contiguous() for k, v in image_encoder.state_dict().items()}, out / IMAGE_ENCODER)
        elif stage == "latents":
            encode_latents(recipe, model, out, progress)
        elif stage == "unet":
            train_unet(recipe, model, out, progress)
            save_model(model, out / FINAL_MODEL, dtype=torch.float16, overwrite=True)
        elif stage == "decoder":
            train_decoder(recipe, model, out, progress)
            check = vae_check(recipe, model) | {"concepts": concept_check(model)}
            write_text_atomic(out / "decoder_check.json", json.dumps(check))
            log.info("toyworld: decoder: PSNR %.1f dB, judge sees %.0f%%; concepts %s", check["psnr_db"],
                     100 * check["judge_all"], ", ".join(f"{k} {v:.0%}" for k, v in check["concepts"].items()))
            save_model(model, out / FINAL_MODEL, dtype=torch.float16, overwrite=True)
        else:
            train_clip(recipe, model, out, progress)
        save_model(model, work, dtype=None, overwrite=True)
        _mark_done(out, stage)
    return out / FINAL_MODEL


def stamp_trained_on(path: str | os.PathLike) -> Path:
    """Write ``TRAINED_ON`` into the config in the header of a ``.safetensors`` model file of this recipe,
    in place (atomically), every tensor's bytes and offsets left as they are: a model of an older run
    gets what a new run writes. Run once on the shipped model when headers began to carry it."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 8:
        raise SdStudioError(f"{path}: not a safetensors file (too short)")
    (length,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8 : 8 + length])
        config = ModelConfig.from_json(header["__metadata__"][METADATA_KEY])
    except (KeyError, TypeError, ValueError) as e:
        raise SdStudioError(f"{path}: no readable '{METADATA_KEY}' in its safetensors header ({e})") from None
    header["__metadata__"][METADATA_KEY] = dataclasses.replace(config, trained_on=TRAINED_ON).to_json()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data keeps its 8-byte alignment, as safetensors writes it

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.write(memoryview(raw)[8 + length :])

    return atomic_write(path, write)


def load_image_encoder(path: str | os.PathLike, width: int = 128) -> ImageEncoder:
    encoder = ImageEncoder(width)
    encoder.load_state_dict(load_file(path))
    return encoder.eval().requires_grad_(False)
