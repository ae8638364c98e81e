"""The toy world's CLIP pair: the embedded model's own text encoder, the image encoder trained against it
(recipe stage ``text``) and a contrastive head (two projections and a temperature) that maps both into
one space, so that images and captions of the world can be compared as with OpenAI's CLIP. Since the
2026-12-07 pair the head's text side pools all token states (``contrastive.TextPool``): the EOS state
alone did not tell which of two objects had which shape. Files without ``head.text_pool.*`` (the first
pair) load with EOS pooling.

The recipe's ``text`` stage trains text encoder, image encoder and a head together, but the first
shipped model kept only the two encoders. The ``clip`` stage (``train_pair``) trains the image side
again against the frozen text encoder: a copy of the image encoder, fine-tuned, and a new head. The text
encoder is the one the UNet reads, so the stage changes nothing of the model, and the toy FID features
(``toyworld_image_encoder.safetensors``) stay as they are. The shipped pair's image side is
``assets/toyworld_clip.safetensors``.

``ToyClip`` has the interface of ``sdstudio.models.clip_vision.ClipModel`` that the captioner and the
metrics use: ``encode_images`` (uint8 images of any size, Lanczos-resized to 64x64 as the toy FID
features are) and ``encode_texts``, both L2-normalised.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sdstudio.errors import SdStudioError
from sdstudio.eval.interrogate import Grammar
from sdstudio.models.configs import ModelConfig
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.toyworld import world
from sdstudio.training.contrastive import ContrastiveHead, ImageEncoder, text_lengths
from sdstudio.training.trainer import TrainConfig, train

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_PAIR = ASSETS / "toyworld_clip.safetensors"
IMAGE_SIZE = world.IMAGE_SIZE


def _text_tokens(texts: Sequence[str], config: ModelConfig, tokenizer: ClipTokenizer) -> Tensor:
    """[N, length] ids framed as inference frames a one-chunk prompt (longer texts: the first chunk), cut
    after the last EOS: the text encoder is causal, so the cut changes no EOS state."""
    from sdstudio.toyworld.recipe import _tokens

    tokens = _tokens(list(texts), config, tokenizer)
    length = int((tokens == ClipTokenizer.EOS).int().argmax(dim=1).max()) + 1
    return tokens[:, :length]


def _pixels(images: Sequence[np.ndarray | Image.Image]) -> Tensor:
    """uint8 RGB images of any size -> [N, 3, 64, 64] in [-1, 1] (others Lanczos-resized to 64x64)."""
    out = []
    for image in images:
        im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        im = im.convert("RGB")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
        out.append(np.asarray(im))
    arr = np.stack(out).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


class ToyClip(nn.Module):
    """The toy world's text encoder and image encoder with their contrastive head."""

    image_size = IMAGE_SIZE
    has_text = True

    def __init__(self, text_encoder: nn.Module, config: ModelConfig, image_encoder: ImageEncoder,
                 head: ContrastiveHead) -> None:  # fmt: skip
        super().__init__()
        self.text_encoder = text_encoder
        self.config = config
        self.image_encoder = image_encoder
        self.head = head
        self._tokenizer = ClipTokenizer()

    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray | Image.Image], batch_size: int = 256) -> Tensor:
        """L2-normalised image embeddings [N, dim] float32."""
        out = [
            self.head.image_proj(self.image_encoder(_pixels(images[i : i + batch_size]))).float()
            for i in range(0, len(images), batch_size)
        ]
        return (
            F.normalize(torch.cat(out), dim=-1) if out else torch.empty(0, self.head.image_proj.out_features)
        )

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 512) -> Tensor:
        """L2-normalised text embeddings [N, dim] float32 (the last layer's EOS state, or the head's pooling
        of its token states, projected)."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a sequence of strings, not one string")
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = _text_tokens(texts[i : i + batch_size], self.config, self._tokenizer)
            pooled = self.head.pool_text(self.text_encoder(tokens, 1), text_lengths(tokens))
            out.append(self.head.text_proj(pooled).float())
        return (
            F.normalize(torch.cat(out), dim=-1) if out else torch.empty(0, self.head.text_proj.out_features)
        )


def train_pair(
    text_encoder: nn.Module,
    config: ModelConfig,
    image_encoder: ImageEncoder,
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    seed: int,
    batch: int,
    p_two: float,
    hard_negatives: float,
    shape_swaps: float = 0.0,
    text_pool: bool = False,
    scene_rng: Callable[[int], np.random.Generator],
    progress: Callable[[int, float], None] | None = None,
    head: ContrastiveHead | None = None,
) -> tuple[ImageEncoder, ContrastiveHead]:
    """The image side of the pair trained against the frozen text encoder: a copy of ``image_encoder``
    (fine-tuned; the original is left as it is) and a new contrastive head, by symmetric InfoNCE over
    batches of ``batch`` random scenes and captions of the world (``hard_negatives``: share of two-object
    scenes repeated with their places swapped, as the ``text`` stage draws them; ``shape_swaps``: share
    repeated with their shapes exchanged, never making a held-out colour-shape pair). ``text_pool``: the
    head pools all token states (``TextPool``), not the EOS state alone. ``scene_rng(step)``: the scenes'
    randomness. ``head``: train a copy of this head (a pair trained further: ``image_encoder`` its encoder;
    ``text_pool`` then follows the head), not a new one. Resumable from ``out_dir`` as every ``train`` run."""
    from sdstudio.toyworld.recipe import text_batch_scenes

    text_encoder.requires_grad_(False).eval()
    encoder = copy.deepcopy(image_encoder).requires_grad_(True).train()
    if head is not None:
        head = copy.deepcopy(head).requires_grad_(True).train()
    else:
        with torch.random.fork_rng():  # initial weights from the seed alone
            torch.manual_seed(seed)
            head = ContrastiveHead(config.text.width, encoder.proj.out_features, text_pool=text_pool)
    modules = nn.ModuleDict({"image_encoder": encoder, "head": head})
    tokenizer = ClipTokenizer()
    # caption -> the frozen encoder's token states up to EOS [length, width] (the world's captions repeat)
    cache: dict[str, Tensor] = {}

    def text_states(captions: list[str]) -> tuple[Tensor, Tensor]:
        new = [c for c in dict.fromkeys(captions) if c not in cache]
        states: dict[str, Tensor] = {}
        if new:
            tokens = _text_tokens(new, config, tokenizer)
            with torch.no_grad():
                hidden = text_encoder(tokens, 1).float()
            states = {c: h[:n] for c, h, n in zip(new, hidden, text_lengths(tokens).tolist())}
            if len(cache) < 50_000:
                cache.update(states)
        rows = [states[c] if c in states else cache[c] for c in captions]
        lengths = torch.tensor([len(r) for r in rows])
        return nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths

    def loss_fn(step: int, gen: torch.Generator) -> Tensor:
        rng = scene_rng(step)
        swaps = round(shape_swaps * batch)
        scenes = text_batch_scenes(rng, batch - swaps, p_two, hard_negatives)
        scenes += shape_swapped(scenes, swaps)
        hidden, lengths = text_states([world.caption(s, rng) for s in scenes])
        loss, _ = head(head.pool_text(hidden, lengths), encoder(_pixels([world.render(s) for s in scenes])))
        return loss

    train(modules, loss_fn, train_config, out_dir, progress=progress)
    return encoder.eval().requires_grad_(False), head.eval().requires_grad_(False)


def shape_swapped(scenes: Sequence[world.Scene], n: int) -> list[world.Scene]:
    """Up to ``n`` of the two-object ``scenes`` with their shapes exchanged (``world.swap_shapes``): those
    with two different shapes whose swap makes no held-out colour-shape pair."""
    out = []
    for scene in scenes:
        if len(out) == n:
            break
        if len(scene.objects) == 2 and scene.objects[0].shape != scene.objects[1].shape:
            swapped = world.swap_shapes(scene)
            if not any(world.is_heldout(o) for o in swapped.objects):
                out.append(swapped)
    return out


def save_pair(image_encoder: ImageEncoder, head: ContrastiveHead, path: str | os.PathLike) -> None:
    """The image side of a toy CLIP pair as one file: ``image_encoder.*`` and ``head.*`` tensors."""
    state = {f"image_encoder.{k}": v for k, v in image_encoder.state_dict().items()}
    state |= {f"head.{k}": v for k, v in head.state_dict().items()}
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt", "sdstudio": "toyworld clip pair (image encoder and contrastive head)"})  # fmt: skip


def load_pair(path: str | os.PathLike) -> tuple[ImageEncoder, ContrastiveHead]:
    """What ``save_pair`` wrote; a clear error for any other file."""
    try:
        state = load_file(str(path))
        enc = {
            k.removeprefix("image_encoder."): v for k, v in state.items() if k.startswith("image_encoder.")
        }
        hd = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        encoder = ImageEncoder(enc["proj.weight"].shape[0])
        encoder.load_state_dict(enc)
        dim, text_width = hd["text_proj.weight"].shape
        pooled = any(k.startswith("text_pool.") for k in hd)
        head = ContrastiveHead(text_width, hd["image_proj.weight"].shape[1], dim, text_pool=pooled)
        head.load_state_dict(hd)
    except (SafetensorError, OSError, KeyError, RuntimeError, IndexError, ValueError) as e:
        raise SdStudioError(
            f"{path}: not a toy-world CLIP pair file (image_encoder.* and head.* tensors; {type(e).__name__}: {e})"
        ) from None
    return encoder.eval().requires_grad_(False), head.eval().requires_grad_(False)


def load_toy_clip(model: str | os.PathLike | None = None, pair: str | os.PathLike | None = None) -> ToyClip:
    """The toy CLIP pair: the text encoder of ``model`` (default: the embedded model) and the image
    encoder with its head from ``pair`` (default: the shipped file)."""
    from sdstudio.models.loading import load_model
    from sdstudio.toyworld.evaluate import SHIPPED_MODEL

    model_path = Path(model) if model is not None else SHIPPED_MODEL
    pair_path = Path(pair) if pair is not None else SHIPPED_PAIR
    for what, p in (("toy-world model", model_path), ("toy-world CLIP pair", pair_path)):
        if not p.is_file():
            raise SdStudioError(f"{p}: no such {what} file")
    encoder, head = load_pair(pair_path)
    loaded = load_model(model_path)
    if loaded.config.text.width != head.text_proj.in_features:
        raise SdStudioError(
            f"{pair_path}: a CLIP pair for a text encoder of width {head.text_proj.in_features}, "
            f"{model_path}'s has {loaded.config.text.width}"
        )
    return ToyClip(loaded.model.cond_stage_model, loaded.config, encoder, head).eval()


def caption_grammar(two_objects: bool = True) -> Grammar:
    """The world's sentences for the captioner, in its canonical words: "a {size} {colour} {shape}
    {position} {background}" (one block: every one of its 3456 sentences is scored), and with
    ``two_objects`` the "{first} and {second}" sentence of two objects, searched from the one-object reading
    by blocks (colour and shape, then size and position, of each object; then the background)."""
    from sdstudio.eval.interrogate import Slot, Template
    from sdstudio.toyworld import language

    def prep(position: str) -> str:
        return "on the" if position in ("top", "left", "right", "bottom") else "in the"

    def obj(suffix: str) -> tuple[Slot, ...]:
        return (
            Slot("size" + suffix, tuple((language.SIZE_WORDS[s][0], s) for s in world.SIZES)),
            Slot("colour" + suffix, tuple((language.COLOUR_WORDS[c][0], c) for c in world.COLOURS)),
            Slot("shape" + suffix, tuple((language.SHAPE_WORDS[s][0], s) for s in world.SHAPES)),
            Slot("position" + suffix,
                 tuple((f"{prep(p)} {language.POSITION_WORDS[p][0]}", p) for p in world.POSITIONS)),
        )  # fmt: skip

    background = Slot("background", tuple((f"on a {language.BACKGROUND_WORDS[b][0]} background", b)
                                          for b in world.BACKGROUNDS))  # fmt: skip
    one = Template("a {size} {colour} {shape} {position} {background}", (*obj(""), background))
    if not two_objects:
        return Grammar((one,))
    first, second = obj(""), obj("2")
    two = Template(
        "a {size} {colour} {shape} {position} and a {size2} {colour2} {shape2} {position2} {background}",
        (*first, *second, background),
        # colour with shape, size with position: 48 + 18 sentences a block instead of 864 an object
        blocks=(
            ("colour2", "shape2"),
            ("size2", "position2"),
            ("colour", "shape"),
            ("size", "position"),
            ("background",),
        ),
        # the two-object sentence must beat the one-object one by this much: over 300 renders (seed 11) it
        # won by at most 0.047 on one-object scenes (95th percentile -0.001) and by at least 0.029 on
        # two-object scenes (5th percentile 0.12)
        bias=-0.04,
    )
    return Grammar((one, two))


CAPTION_ATTRIBUTES = ("colour", "shape", "size", "position", "background", "objects")


def _object_values(values: Mapping[str, str]) -> list[dict[str, str]]:
    objs = [{a: values[a] for a in ("size", "colour", "shape", "position") if a in values}]
    if "shape2" in values:
        objs.append({a: values[a + "2"] for a in ("size", "colour", "shape", "position")})
    return objs


def caption_accuracy(scenes: Sequence[world.Scene], values: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Share of the scenes' attributes the captions' readings (``Caption.values``) got right: per object
    (matched to the scene's objects in the order that agrees most), colour, shape, size and position;
    per scene, background and the number of objects. An object a caption leaves out counts as wrong."""
    right = dict.fromkeys(CAPTION_ATTRIBUTES, 0)
    objects = 0
    for scene, read in zip(scenes, values, strict=True):
        got = _object_values(read)
        truth = [
            {"size": o.size, "colour": o.colour, "shape": o.shape, "position": o.position}
            for o in scene.objects
        ]
        best: dict[str, int] = {}
        for order in itertools.permutations(range(len(got)), min(len(got), len(truth))):
            hits = {a: sum(got[j].get(a) == truth[i][a] for i, j in enumerate(order)) for a in truth[0]}
            if sum(hits.values()) > sum(best.values(), -1):
                best = hits
        for a, n in best.items():
            right[a] += n
        objects += len(truth)
        right["background"] += read.get("background") == scene.background
        right["objects"] += len(got) == len(truth)
    return {a: right[a] / (objects if a in ("colour", "shape", "size", "position") else len(scenes))
            for a in CAPTION_ATTRIBUTES}  # fmt: skip
