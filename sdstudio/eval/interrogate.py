"""The captioner (AUTOMATIC1111's "Interrogate CLIP", pharmapsychotic's CLIP Interrogator): a base caption
(BLIP, when its weights are given; or the best sentence of a grammar), then phrases from phrase lists
ranked by CLIP similarity with the image.

Two ways to rank text against an image, both with any model that has ``encode_images`` /
``encode_texts`` (``models.clip_vision.ClipModel``, the toy world's ``ToyClip``):

- a **grammar** (``Grammar``): sentences built from templates whose slots take values from lists
  (the toy world's: "a {size} {colour} {shape} {position} {background}"). Each template is searched
  block by block (``Template.blocks``: slots searched jointly, every combination of their values, the
  other slots held), a block's best kept, until no block changes; a block's sentences are scored all at
  once and their embeddings kept, so a one-block template is an exhaustive search that costs a single
  matrix product per image once its sentences are encoded. The best-scoring sentence of all templates
  is the caption; ``Caption.values`` says what each slot read.
- **phrase lists** (``PhraseList``: mediums, movements, flavours, and the user's own ``.txt`` lists)
  appended to the base caption, by ``mode``:
  ``classic`` (A1111): the best phrase of each list, and the ``top_flavors`` best of the flavour list;
  ``fast``: the phrases of all lists most similar to the image, as many as fit CLIP's 75 tokens;
  ``best``: a chain: the phrase (among the ``chain_candidates`` most similar) that most raises the
  similarity of the whole caption is appended, again and again, until none raises it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from sdstudio.errors import SdStudioError

Mode = Literal["fast", "classic", "best"]
MODES: tuple[str, ...] = ("fast", "classic", "best")
PHRASES_DIR = Path(__file__).resolve().parent / "phrases"
FLAVOUR_LISTS = ("flavors", "flavours")
MAX_TOKENS = 75  # CLIP's context without BOS / EOS
# text embeddings a captioner keeps: the lists' phrases and the grammar's sentences, which recur from image
# to image (a whole toy one-object grammar is 3456); whole captions, one-off per image, are never kept
MAX_KEPT_TEXTS = 20_000


class ImageTextModel(Protocol):
    def encode_images(self, images: Sequence[np.ndarray]) -> Tensor: ...
    def encode_texts(self, texts: Sequence[str]) -> Tensor: ...


@dataclass(frozen=True)
class Slot:
    """A slot of a template: ``values`` are (text as written in the sentence, what it reads as)."""

    name: str
    values: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Template:
    """``text`` with ``{slot}`` fields; ``blocks``: groups of slot names searched jointly, in order (None:
    one block of all slots, an exhaustive search); ``bias``: added to its sentence's similarity when the
    templates' best sentences are compared (negative: a longer sentence must win by that margin)."""

    text: str
    slots: tuple[Slot, ...]
    blocks: tuple[tuple[str, ...], ...] | None = None
    bias: float = 0.0

    def __post_init__(self) -> None:
        names = [s.name for s in self.slots]
        if self.blocks is not None and set(itertools.chain(*self.blocks)) != set(names):
            raise ValueError(f"blocks {self.blocks} must hold each slot of {names}, and no other name")

    def render(self, choice: Mapping[str, int]) -> str:
        slots = {s.name: s for s in self.slots}
        text = self.text.format(**{name: slots[name].values[i][0] for name, i in choice.items()})
        return " ".join(text.split())


@dataclass(frozen=True)
class Grammar:
    templates: tuple[Template, ...]
    max_sweeps: int = 4


@dataclass(frozen=True)
class PhraseList:
    name: str
    phrases: tuple[str, ...]


@dataclass(frozen=True)
class RankedPhrase:
    list: str
    phrase: str
    similarity: float


@dataclass(frozen=True)
class Caption:
    """``text``: the whole caption; ``base``: BLIP's caption or the grammar's sentence ('' without either);
    ``values``: each grammar slot's reading; ``phrases``: the appended phrases; ``similarity``: cosine
    similarity of ``text`` with the image."""

    text: str
    base: str
    values: Mapping[str, str] = field(default_factory=dict)
    phrases: tuple[RankedPhrase, ...] = ()
    similarity: float = 0.0


def read_phrase_list(path: str | os.PathLike) -> PhraseList:
    """One phrase a line (blank lines and ``#`` comments skipped); the list is named by the file's stem."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SdStudioError(f"{path}: cannot read the phrase list ({e})") from None
    phrases = tuple(dict.fromkeys(s for line in lines if (s := line.strip()) and not s.startswith("#")))
    if not phrases:
        raise SdStudioError(f"{path}: the phrase list holds no phrases (one phrase a line)")
    return PhraseList(path.stem, phrases)


def phrase_lists(paths: Iterable[str | os.PathLike] = (), builtin: bool = True) -> tuple[PhraseList, ...]:
    """The built-in lists (mediums, movements, flavors) unless ``builtin`` is False, then every ``.txt`` of
    each folder in ``paths`` (a file: that list). A user list named like a built-in one replaces it."""
    lists: dict[str, PhraseList] = {}
    sources = ([PHRASES_DIR] if builtin else []) + [Path(p) for p in paths]
    for source in sources:
        if source.is_dir():
            files = sorted(source.glob("*.txt"))
            if not files:
                raise SdStudioError(
                    f"{source}: no phrase lists (.txt files, one phrase a line) in the folder"
                )
        elif source.is_file():
            files = [source]
        else:
            raise SdStudioError(f"{source}: no such phrase list file or folder")
        for f in files:
            lst = read_phrase_list(f)
            lists[lst.name] = lst
    return tuple(lists.values())


def _similarity(image: Tensor, texts: Tensor) -> Tensor:
    return texts @ image  # both L2-normalised: cosine similarities [n]


MIRRORED_WORDS = {"left": "right", "right": "left"}
PAIR_BLOCK_MAX = 100  # sentences in the joint block of one parallel group searched with the template's blocks
JOINT_BLOCK_MAX = 150  # sentences in the final joint block of several parallel groups


def mirrored(text: str) -> str:
    """What ``text`` says of the mirrored image (left and right exchanged)."""
    return " ".join(MIRRORED_WORDS.get(w, w) for w in text.split(" "))


def parallel_groups(template: Template) -> list[tuple[str, ...]]:
    """Slots that take the same values (the same attribute of different objects: ``shape``, ``shape2``),
    groups of two or more in the template's order."""
    groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for s in template.slots:
        groups.setdefault(s.values, []).append(s.name)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def _joint_size(template: Template, names: Iterable[str]) -> int:
    sizes = {s.name: len(s.values) for s in template.slots}
    return int(np.prod([sizes[n] for n in names]))


def pair_group(template: Template) -> tuple[str, ...]:
    """The parallel group of the most values whose joint block holds at most ``PAIR_BLOCK_MAX`` sentences
    (the toy world's two positions: 81), searched with the template's blocks (() when none)."""
    fits = [g for g in parallel_groups(template) if _joint_size(template, g) <= PAIR_BLOCK_MAX]
    return max(fits, key=lambda g: _joint_size(template, g), default=())


def joint_groups(template: Template) -> list[tuple[str, ...]]:
    """The parallel groups of the fewest values, fewest first, while their joint block holds at most
    ``JOINT_BLOCK_MAX`` sentences (the toy world's sizes and shapes of both objects: 144)."""
    out: list[tuple[str, ...]] = []
    for g in sorted(parallel_groups(template), key=lambda g: _joint_size(template, g)):
        if _joint_size(template, itertools.chain(*out, g)) > JOINT_BLOCK_MAX:
            break
        out.append(g)
    return out


class Captioner:
    """Captions images with ``model``; ``blip``: images -> base captions (None: no BLIP); ``grammar``:
    sentences ranked for the base caption (used when no BLIP is given); ``lists``: phrase lists."""

    def __init__(
        self,
        model: ImageTextModel,
        *,
        grammar: Grammar | None = None,
        lists: Sequence[PhraseList] = (),
        blip: Callable[[Sequence[np.ndarray]], list[str]] | None = None,
        top_flavors: int = 3,
        chain_candidates: int = 64,
        max_chain: int = 8,
        count_tokens: Callable[[str], int] | None = None,
        mirror: bool = True,
    ) -> None:
        if grammar is None and blip is None and not lists:
            raise SdStudioError("a captioner needs BLIP weights, a grammar or phrase lists to caption with")
        self.model = model
        self.grammar = grammar
        self.lists = tuple(lists)
        self.blip = blip
        self.top_flavors = top_flavors
        self.chain_candidates = chain_candidates
        self.max_chain = max_chain
        self.count_tokens = count_tokens or (lambda text: len(text.replace(",", " , ").split()))
        self.mirror = mirror
        self._embeddings: dict[str, Tensor] = {}

    def embed(self, texts: Sequence[str], keep: bool = True) -> Tensor:
        """[len(texts), dim] text embeddings; ``keep``: texts that recur (phrases, grammar sentences), kept
        for later images while fewer than ``MAX_KEPT_TEXTS`` are (a server captions without end)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._embeddings]
        fresh = dict(zip(new, self.model.encode_texts(new).float().cpu())) if new else {}
        if keep:
            for t, e in fresh.items():
                if len(self._embeddings) >= MAX_KEPT_TEXTS:
                    break
                self._embeddings[t] = e
        return torch.stack([fresh[t] if t in fresh else self._embeddings[t] for t in texts])

    # -- grammar ------------------------------------------------------------------------------------

    def _scores(self, template: Template, options: Sequence[Mapping[str, int]], image: Tensor,
                mirror: Tensor | None = None) -> Tensor:  # fmt: skip
        """Similarities of ``options`` with ``image``; with ``mirror`` (the mirrored image's embedding), the
        mean with the mirrored sentences' similarities to it (test-time augmentation)."""
        texts = [template.render(o) for o in options]
        sims = _similarity(image, self.embed(texts))
        if mirror is not None:
            sims = 0.5 * (sims + _similarity(mirror, self.embed([mirrored(t) for t in texts])))
        return sims

    def _ascend(self, template: Template, image: Tensor, choice: dict[str, int], best: float,
                blocks: Sequence[tuple[str, ...]], sweeps: int,
                mirror: Tensor | None = None) -> tuple[dict[str, int], float]:  # fmt: skip
        """Coordinate ascent: each block's best combination of values (the other slots held), until a sweep
        changes nothing (at most ``sweeps``)."""
        sizes = {s.name: len(s.values) for s in template.slots}
        for _ in range(sweeps):
            changed = False
            for block in blocks:
                combos = itertools.product(*(range(sizes[n]) for n in block))
                options = [choice | dict(zip(block, combo)) for combo in combos]
                sims = self._scores(template, options, image, mirror)
                i = int(sims.argmax())
                if float(sims[i]) > best + 1e-7:
                    changed = changed or options[i] != choice
                    choice, best = options[i], float(sims[i])
            if not changed or len(blocks) == 1:
                break
        return choice, best

    def _search(
        self, template: Template, image: Tensor, start: Mapping[str, int],
        ranked: Sequence[Mapping[str, int]] = (), mirror: Tensor | None = None,
    ) -> tuple[dict[str, int], float, list[dict[str, int]]]:  # fmt: skip
        """The template's best choice of values, its similarity, and (one-block templates) every choice,
        best first. A template of blocks: the copies of ``parallel_groups`` that ``start`` lacks start from
        the best of ``ranked`` (an earlier template's readings) that differs from ``start`` in each group;
        coordinate ascent over the template's blocks and the joint block of ``pair_group``'s copies; then
        one joint block of ``joint_groups``' copies, scored with the mirrored image too when ``mirror`` is
        given (the similarity returned is the plain one, comparable with other templates')."""
        choice = {s.name: start.get(s.name, 0) for s in template.slots}
        if template.blocks is None:
            combos = itertools.product(*(range(len(s.values)) for s in template.slots))
            options = [dict(zip(choice, combo)) for combo in combos]
            sims = self._scores(template, options, image)
            order = torch.argsort(sims, descending=True).tolist()
            return options[order[0]], float(sims[order[0]]), [options[i] for i in order]
        groups = parallel_groups(template)
        firsts = [g[0] for g in groups]
        for reading in ranked:
            if all(n in reading and reading[n] != choice[n] for n in firsts):
                for g in groups:
                    choice |= {n: reading[g[0]] for n in g[1:] if n not in start}
                break
        sweeps = self.grammar.max_sweeps if self.grammar else 1
        pair = pair_group(template)
        blocks = tuple(template.blocks) + ((pair,) if pair else ())
        best = float(self._scores(template, [choice], image)[0])
        choice, best = self._ascend(template, image, choice, best, blocks, sweeps)
        joint = tuple(itertools.chain(*joint_groups(template)))
        if len(joint) > 1:
            held = float(self._scores(template, [choice], image, mirror)[0])
            choice, _ = self._ascend(template, image, choice, held, (joint,), 1, mirror)
            best = float(self._scores(template, [choice], image)[0])
        return choice, best, []

    def _grammar_caption(
        self, image: Tensor, mode: Mode, mirror: Tensor | None = None
    ) -> tuple[str, dict[str, str], float]:
        assert self.grammar is not None
        templates = self.grammar.templates[:1] if mode == "fast" else self.grammar.templates
        best: tuple[str, dict[str, str], float] = ("", {}, -2.0)
        start: dict[str, int] = {}
        ranked: list[dict[str, int]] = []
        for template in templates:
            choice, sim, readings = self._search(template, image, start, ranked, mirror)
            start = start or choice  # later templates start from the first one's reading
            ranked = ranked or readings
            if sim + template.bias > best[2]:
                slots = {s.name: s for s in template.slots}
                values = {name: slots[name].values[i][1] for name, i in choice.items()}
                best = (template.render(choice), values, sim + template.bias)
        return best

    # -- phrase lists -------------------------------------------------------------------------------

    def _join(self, base: str, phrases: Sequence[str]) -> str:
        return ", ".join([p for p in (base, *phrases) if p])

    def _ranked(self, lst: PhraseList, image: Tensor, k: int) -> list[RankedPhrase]:
        sims = _similarity(image, self.embed(lst.phrases))
        top = torch.topk(sims, min(k, len(lst.phrases)))
        return [
            RankedPhrase(lst.name, lst.phrases[int(i)], float(s)) for s, i in zip(top.values, top.indices)
        ]

    def _phrases(self, base: str, image: Tensor, mode: Mode) -> list[RankedPhrase]:
        if not self.lists:
            return []
        if mode == "classic":
            out = []
            for lst in self.lists:
                out += self._ranked(lst, image, self.top_flavors if lst.name in FLAVOUR_LISTS else 1)
            return out
        pool = sorted((r for lst in self.lists for r in self._ranked(lst, image, self.chain_candidates)),
                      key=lambda r: -r.similarity)  # fmt: skip
        if mode == "fast":
            out, text = [], base
            for r in pool:
                longer = self._join(text, [r.phrase])
                if self.count_tokens(longer) > MAX_TOKENS:
                    break
                out.append(r)
                text = longer
            return out
        chosen: list[RankedPhrase] = []
        current = float(_similarity(image, self.embed([base], keep=False))[0]) if base else -2.0
        for _ in range(self.max_chain):
            used = {r.phrase for r in chosen}
            candidates = [r for r in pool[: self.chain_candidates] if r.phrase not in used]
            texts = [self._join(base, [*(c.phrase for c in chosen), r.phrase]) for r in candidates]
            texts_ok = [(r, t) for r, t in zip(candidates, texts) if self.count_tokens(t) <= MAX_TOKENS]
            if not texts_ok:
                break
            sims = _similarity(image, self.embed([t for _, t in texts_ok], keep=False))
            i = int(sims.argmax())
            if float(sims[i]) <= current:
                break
            chosen.append(texts_ok[i][0])
            current = float(sims[i])
        return chosen

    # -- whole captions -----------------------------------------------------------------------------

    def caption(self, images: Sequence[np.ndarray], mode: Mode = "best") -> list[Caption]:
        """A caption per uint8 HxWx3 image."""
        if mode not in MODES:
            raise SdStudioError(f"caption mode {mode!r}: choose {', '.join(MODES)}")
        if not len(images):
            return []
        embeddings = self.model.encode_images(list(images)).float().cpu()
        mirrors = None  # used by the final joint block of a two-object search, which "fast" never runs
        if self.grammar is not None and self.blip is None and self.mirror and mode != "fast":
            flipped = [np.ascontiguousarray(np.asarray(im)[:, ::-1]) for im in images]
            mirrors = self.model.encode_images(flipped).float().cpu()
        blip = self.blip(images) if self.blip is not None else None
        out = []
        for k, image in enumerate(embeddings):
            values: dict[str, str] = {}
            if blip is not None:
                base = blip[k].strip()
            elif self.grammar is not None:
                mirror = mirrors[k] if mirrors is not None else None
                base, values, _ = self._grammar_caption(image, mode, mirror)
            else:
                base = ""
            phrases = self._phrases(base, image, mode)
            text = self._join(base, [p.phrase for p in phrases])
            similarity = float(_similarity(image, self.embed([text], keep=False))[0]) if text else 0.0
            out.append(Caption(text, base, values, tuple(phrases), similarity))
        return out
