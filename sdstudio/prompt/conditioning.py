"""Parsed prompt -> conditioning tensors, as AUTOMATIC1111's ``modules/sd_hijack_clip.py`` builds them.

Each scheduled text's attention runs are tokenized run by run and packed into chunks of 75 tokens
framed as ``[BOS, 75 tokens, EOS]`` (:func:`tokenize_attention`, A1111's ``tokenize_line``):

* a full chunk whose last comma is at most ``comma_backtrack`` (A1111's ``comma_padding_backtrack``,
  default 20) tokens back moves the text after that comma to the next chunk;
* ``BREAK`` ends the current chunk (padding it);
* textual inversion embeddings replace the tokens of their names and never straddle two chunks.

Padding is EOS for SD 1.x and, for SD 2.x (``pad_with_eos=False``), 0 after the first EOS, as A1111's
``process_tokens`` does. Every chunk goes through the text encoder on its own (positions 0..76) and
the hidden states of a text's chunks are concatenated along the token axis. A1111's "Original"
emphasis then scales each token's hidden state by its attention weight and rescales the chunk so its
mean is what it was: ``z *= w; z *= mean_before / mean_after``.

:func:`encode_conditioning` encodes every distinct text of a prompt and its negative once, pads them
to one token count with encoded empty chunks (A1111's ``pad_cond``) and returns step schedules that
index those rows, for the guided denoiser.

Differences from A1111, each deliberate: the emphasis mean is taken per chunk of one text (A1111 takes
it over all texts encoded in the same batch, so a text's conditioning there depends on its batch
neighbours); AND sub-prompts of unequal length are padded with empty chunks like the negative (A1111
repeats the last vector); an embedding moved to the next chunk by the comma rule keeps its vectors
(A1111 leaves its fix behind in the old chunk).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdstudio.models.configs import TextEncoderConfig
from sdstudio.models.sdxl import NEGATIVE_AESTHETIC_SCORE, GeneralConditioner, SizeConditioning, size_vector
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.prompt.embeddings import Embedding, EmbeddingDatabase
from sdstudio.prompt.parser import ParsedPrompt, ScheduleEntry, parse_prompt_attention
from sdstudio.types import CondSchedule, WeightedCond

BOS = ClipTokenizer.BOS
EOS = ClipTokenizer.EOS
CHUNK = ClipTokenizer.CHUNK  # prompt tokens per chunk
WINDOW = CHUNK + 2  # with BOS and EOS: the text encoder's 77 positions
COMMA_BACKTRACK = 20  # A1111's default comma_padding_backtrack


def frame_chunk(body: Sequence[int], pad_with_eos: bool) -> list[int]:
    """``[BOS, *body, EOS, pad...]`` of 77 ids; ``body`` holds at most 75 ids."""
    if len(body) > CHUNK:
        raise ValueError(f"a chunk holds at most {CHUNK} tokens, got {len(body)}")
    ids = [BOS, *body] + [EOS] * (CHUNK - len(body)) + [EOS]
    if not pad_with_eos:  # SD 2.x: 0 after the first EOS (A1111's process_tokens)
        end = ids.index(EOS)
        ids[end + 1 :] = [0] * (WINDOW - end - 1)
    return ids


def chunk_tokens(ids: list[int], config: TextEncoderConfig) -> list[list[int]]:
    """Plain token ids (no weights, no embeddings) split into chunks of 75, each framed to 77 ids."""
    pieces = [ids[i : i + CHUNK] for i in range(0, len(ids), CHUNK)] or [[]]
    return [frame_chunk(piece, config.pad_with_eos) for piece in pieces]


@dataclass(frozen=True)
class PromptChunk:
    """One 77-token window: ids, per-token attention weights, and embeddings spliced in."""

    tokens: tuple[int, ...]  # 77 ids, BOS and EOS included; 0 where an embedding's vectors go
    multipliers: tuple[float, ...]  # 77 weights, 1.0 for BOS, EOS and padding
    fixes: tuple[tuple[int, Embedding], ...] = ()  # (position in the 77, embedding) pairs
    length: int = 0  # prompt tokens in the chunk (embedding vectors count one each), without padding


class _ChunkBuilder:
    """The chunk being filled (tokenizer-internal, mutable)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.multipliers: list[float] = []
        self.fixes: list[tuple[int, Embedding]] = []  # positions in ``tokens`` (before BOS)

    def finish(self, pad_with_eos: bool) -> PromptChunk:
        padding = CHUNK - len(self.tokens)
        return PromptChunk(
            tokens=tuple(frame_chunk(self.tokens, pad_with_eos)),
            multipliers=(1.0, *self.multipliers, *([1.0] * padding), 1.0),
            fixes=tuple((offset + 1, embedding) for offset, embedding in self.fixes),
            length=len(self.tokens),
        )


def tokenize_attention(
    attention: Sequence[tuple[str, float]],
    tokenizer: ClipTokenizer,
    config: TextEncoderConfig,
    embeddings: EmbeddingDatabase | None = None,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> tuple[PromptChunk, ...]:
    """Pack ``(fragment, weight)`` runs (the parser's ``attention``) into 77-token chunks (A1111's
    ``tokenize_line``); ``("BREAK", -1.0)`` starts a new chunk. Always at least one chunk."""
    comma = tokenizer.token_for(",")
    chunks: list[PromptChunk] = []
    chunk = _ChunkBuilder()
    last_comma = -1

    def next_chunk() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk.finish(config.pad_with_eos))
        chunk = _ChunkBuilder()
        last_comma = -1

    for text, weight in attention:
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        tokens = tokenizer.encode(text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (
                comma_backtrack != 0
                and len(chunk.tokens) == CHUNK
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= comma_backtrack
            ):
                # the full chunk ends mid-phrase: move the words after its last comma to the next one
                cut = last_comma + 1
                moved = chunk.tokens[cut:], chunk.multipliers[cut:]
                moved_fixes = [(offset - cut, emb) for offset, emb in chunk.fixes if offset >= cut]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                chunk.fixes = [(offset, emb) for offset, emb in chunk.fixes if offset < cut]
                next_chunk()
                chunk.tokens, chunk.multipliers = list(moved[0]), list(moved[1])
                chunk.fixes = moved_fixes
            if len(chunk.tokens) == CHUNK:
                next_chunk()
            found = embeddings.match(tokens, position) if embeddings is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            embedding, name_tokens = found
            if len(chunk.tokens) + embedding.n_vectors > CHUNK:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * embedding.n_vectors
            chunk.multipliers += [weight] * embedding.n_vectors
            position += name_tokens
    if chunk.tokens or not chunks:
        next_chunk()
    return tuple(chunks)


def _token_embeds(
    embedding_table: nn.Embedding, tokens: Tensor, chunks: Sequence[PromptChunk], encoder: int = 0
) -> Tensor | None:
    """The token vectors of ``tokens`` [n, 77] with each chunk's embeddings spliced in (their vectors for
    text encoder number ``encoder``); None without any."""
    if not any(c.fixes for c in chunks):
        return None
    token_embeds = embedding_table(tokens).clone()  # [n, 77, width]
    for row, chunk in enumerate(chunks):
        for offset, embedding in chunk.fixes:
            count = min(embedding.n_vectors, WINDOW - offset)
            token_embeds[row, offset : offset + count] = embedding.vectors_for(encoder)[:count].to(token_embeds)
    return token_embeds


def _emphasis(hidden: Tensor, chunks: Sequence[PromptChunk]) -> Tensor:
    """A1111's "Original" emphasis on each chunk's hidden states [n, 77, width]: weight each token's state,
    then restore the chunk's mean."""
    rows = []
    for row, chunk in zip(hidden, chunks):
        if any(m != 1.0 for m in chunk.multipliers):
            original_mean = row.mean()
            row = row * torch.tensor(chunk.multipliers, dtype=row.dtype, device=row.device)[:, None]
            row = row * (original_mean / row.mean())
        rows.append(row)
    return torch.stack(rows)


def repad(tokens: Sequence[int], pad_with_eos: bool) -> list[int]:
    """A framed chunk's ids padded as another encoder pads: EOS to the end, or 0 after the first EOS."""
    ids = list(tokens)
    end = ids.index(EOS)
    ids[end + 1 :] = [EOS if pad_with_eos else 0] * (len(ids) - end - 1)
    return ids


def encode_chunks_pooled(
    text_encoder: nn.Module, chunks: Sequence[PromptChunk], clip_skip: int
) -> tuple[Tensor, Tensor | None]:
    """Hidden states of each chunk with its embeddings and emphasis applied, float32 [n_chunks, 77, width],
    and SDXL's pooled text of each chunk [n_chunks, projection] (None for one text encoder).

    SDXL (``GeneralConditioner``): each encoder reads the chunk padded its own way, emphasis applies to
    each encoder's states apart (A1111 runs one ``process_tokens`` per embedder), and the states are joined
    on the width axis, CLIP-L's first."""
    device = next(text_encoder.parameters()).device
    if not isinstance(text_encoder, GeneralConditioner):
        tokens = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=device)  # [n, 77]
        token_embeds = _token_embeds(text_encoder.token_embedding, tokens, chunks)
        hidden = text_encoder(tokens, clip_skip, token_embeds=token_embeds).float()  # [n, 77, width]
        return _emphasis(hidden, chunks), None
    per_encoder = [
        torch.tensor([repad(c.tokens, config.pad_with_eos) for c in chunks], dtype=torch.long, device=device)
        for config in text_encoder.configs
    ]
    embeds = [
        _token_embeds(encoder.token_embedding, ids, chunks, i)
        for i, (encoder, ids) in enumerate(zip(text_encoder.encoders, per_encoder))
    ]
    states, pooled = text_encoder.encode(per_encoder, clip_skip, embeds)
    hidden = torch.cat([_emphasis(h.float(), chunks) for h in states], dim=-1)  # [n, 77, sum of widths]
    return hidden, pooled.float()


def encode_chunks(text_encoder: nn.Module, chunks: Sequence[PromptChunk], clip_skip: int) -> Tensor:
    """Hidden states of each chunk with its embeddings and emphasis applied, float32. [n_chunks, 77, width]"""
    return encode_chunks_pooled(text_encoder, chunks, clip_skip)[0]


def encode_padded_pooled(
    text_encoder: nn.Module,
    tokenizer: ClipTokenizer,
    config: TextEncoderConfig,
    per_text: Sequence[Sequence[PromptChunk]],
    clip_skip: int,
) -> tuple[Tensor, Tensor | None]:
    """Each text's chunks encoded in one text-encoder call, shorter texts padded with an encoded empty chunk
    (A1111's ``pad_cond``), float32 [n_texts, 77 * most chunks, width]; and SDXL's pooled text of each
    text's first chunk [n_texts, projection] (A1111's ``zs[0].pooled``), None for one text encoder."""
    n_chunks = max(len(chunks) for chunks in per_text)
    flat = [chunk for chunks in per_text for chunk in chunks]
    needs_padding = any(len(chunks) < n_chunks for chunks in per_text)
    if needs_padding:
        flat.append(tokenize_attention([("", 1.0)], tokenizer, config)[0])
    hidden, pooled = encode_chunks_pooled(text_encoder, flat, clip_skip)  # [total_chunks (+1), 77, width]
    empty = hidden[-1:] if needs_padding else None
    stacked, firsts, start = [], [], 0
    for chunks in per_text:
        parts = [hidden[start : start + len(chunks)]]
        if len(chunks) < n_chunks:
            parts.append(empty.expand(n_chunks - len(chunks), -1, -1))  # type: ignore[union-attr]
        firsts.append(start)
        start += len(chunks)
        stacked.append(torch.cat(parts).reshape(-1, hidden.shape[-1]))  # [77 * n_chunks, width]
    return torch.stack(stacked), None if pooled is None else pooled[firsts]


def encode_padded(
    text_encoder: nn.Module,
    tokenizer: ClipTokenizer,
    config: TextEncoderConfig,
    per_text: Sequence[Sequence[PromptChunk]],
    clip_skip: int,
) -> Tensor:
    """:func:`encode_padded_pooled` without the pooled text. [n_texts, 77 * most chunks, width]"""
    return encode_padded_pooled(text_encoder, tokenizer, config, per_text, clip_skip)[0]


def encode_captions(
    text_encoder: nn.Module,
    tokenizer: ClipTokenizer,
    config: TextEncoderConfig,
    captions: Sequence[str],
    clip_skip: int,
    embeddings: EmbeddingDatabase | None = None,
) -> Tensor:
    """Training captions as the text encoder sees prompts (attention syntax, chunks, embeddings by name),
    with gradients flowing to trainable embedding vectors and text-encoder weights when enabled.
    [batch, 77 * chunks, width]"""
    per_text = [
        tokenize_attention(parse_prompt_attention(c), tokenizer, config, embeddings) for c in captions
    ]
    return encode_padded(text_encoder, tokenizer, config, per_text, clip_skip)


@dataclass(frozen=True)
class Conditioning:
    """Every distinct text of a prompt and its negative, encoded once, with the schedules over them.

    ``tensors[k]`` is text ``texts[k]`` (texts with identical tokens and weights share a row); all rows have the same token count (77 per chunk of the
    longest text; shorter texts end in encoded empty chunks), so any of them batch together.
    """

    tensors: Tensor  # [n_texts, 77 * n_chunks, width], float32
    texts: tuple[str, ...]
    chunk_lengths: tuple[tuple[int, ...], ...]  # per text, the prompt tokens in each of its chunks
    positive: tuple[WeightedCond, ...]  # one per AND sub-prompt
    negative: CondSchedule
    # SDXL: each row's vector y (pooled text and micro-conditioning) [n_texts, adm_in_channels]; else None
    vectors: Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.tensors.shape[1])


def encode_conditioning(
    text_encoder: nn.Module,
    tokenizer: ClipTokenizer,
    config: TextEncoderConfig,
    positive: ParsedPrompt,
    negative: ParsedPrompt,
    clip_skip: int,
    embeddings: EmbeddingDatabase | None = None,
    comma_backtrack: int = COMMA_BACKTRACK,
    size: SizeConditioning | None = None,
) -> Conditioning:
    """Conditioning for a parsed prompt and its parsed negative (``parse(..., composable=False)``).

    One text-encoder call for all chunks of all distinct texts, each text counted once however many
    sub-prompts or steps use it.

    SDXL (``text_encoder`` a ``GeneralConditioner``) needs ``size``, the image's micro-conditioning, and
    gets each row's vector. Its negative rows are its own: an empty negative prompt is all zeros, text and
    pooled text alike (A1111's ``force_zero_negative_prompt``, diffusers' ``force_zeros_for_empty_prompt``),
    and the refiner's negative vector carries the low aesthetic score.
    """
    if len(negative.subprompts) != 1:
        raise ValueError("the negative prompt must be parsed with composable=False (one sub-prompt)")
    sdxl = isinstance(text_encoder, GeneralConditioner)
    if sdxl and size is None:
        raise ValueError("SDXL conditioning needs the image's sizes (size=SizeConditioning...)")
    by_text: dict[str, tuple[PromptChunk, ...]] = {}
    # Texts that tokenize the same (" cat" and "cat") share one row: (side, chunks) -> row, first-use order.
    rows: dict[tuple[bool, tuple[PromptChunk, ...]], int] = {}
    texts: list[str] = []

    def schedule_of(entries: Sequence[ScheduleEntry], is_negative: bool = False) -> CondSchedule:
        indices = []
        for entry in entries:
            chunks = by_text.get(entry.text)
            if chunks is None:
                chunks = by_text[entry.text] = tokenize_attention(
                    entry.attention, tokenizer, config, embeddings, comma_backtrack
                )
            key = (sdxl and is_negative, chunks)  # SDXL: negative rows apart
            if key not in rows:
                rows[key] = len(rows)
                texts.append(entry.text)
            indices.append(rows[key])
        return CondSchedule(tuple(e.end_at_step for e in entries), tuple(indices))

    weighted = tuple(WeightedCond(sub.weight, schedule_of(sub.schedule)) for sub in positive.subprompts)
    negative_entries = negative.subprompts[0].schedule
    uncond = schedule_of(negative_entries, is_negative=True)
    per_text = [chunks for _, chunks in rows]
    tensors, pooled = encode_padded_pooled(text_encoder, tokenizer, config, per_text, clip_skip)
    vectors = None
    if sdxl:
        assert pooled is not None and size is not None
        negative_rows = [row for (is_negative, _), row in rows.items() if is_negative]
        if all(entry.text == "" for entry in negative_entries):
            tensors[negative_rows] = 0.0
            pooled[negative_rows] = 0.0
        vectors = size_vector(pooled, size, refiner=text_encoder.refiner)
        if text_encoder.refiner:
            low = dataclasses.replace(size, aesthetic=NEGATIVE_AESTHETIC_SCORE)
            vectors[negative_rows] = size_vector(pooled[negative_rows], low, refiner=True)
    return Conditioning(
        tensors=tensors,
        texts=tuple(texts),
        chunk_lengths=tuple(tuple(c.length for c in chunks) for chunks in per_text),
        positive=weighted,
        negative=uncond,
        vectors=vectors,
    )


_NETWORKS = {"lora": "LoRA", "lyco": "LoRA", "hypernet": "hypernetwork"}


def prompt_warnings(
    parsed: ParsedPrompt, embeddings: EmbeddingDatabase | None = None, networks_applied: bool = False
) -> list[str]:
    """What a prompt asks for that generation will not do: extra networks of unknown kinds (and, unless
    ``networks_applied`` says the caller applies them, LoRA and hypernetwork tags), skipped embeddings."""
    warnings = []
    for tag in parsed.extra_networks:
        written = f"<{tag.kind}:{':'.join(tag.args)}>"
        feature = _NETWORKS.get(tag.kind)
        if feature is not None:
            if not networks_applied:
                warnings.append(
                    f"{written} ignored: {feature} tags are applied by sdstudio.engine.Pipeline "
                    "(or pass the networks to generate())"
                )
        else:
            warnings.append(f"unknown extra network kind {tag.kind!r}: {written} ignored")
    if embeddings is not None:
        texts = dict.fromkeys(entry.text for sub in parsed.subprompts for entry in sub.schedule)
        for name in dict.fromkeys(name for text in texts for name in embeddings.skipped_names_in(text)):
            warnings.append(f"embedding {name!r} was skipped (bad file), so the prompt uses it as plain text")
    return warnings
