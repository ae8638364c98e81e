"""Parsed prompt -> conditioning: A1111's chunking, emphasis with mean restoration, CLIP skip, dedup."""

import pytest
import torch
from torch import nn

from sdstudio.models.configs import PRESETS
from sdstudio.models.stablediffusion import random_model
from sdstudio.models.tokenizer import BOS, EOS, ClipTokenizer
from sdstudio.prompt.conditioning import (
    chunk_tokens,
    encode_conditioning,
    tokenize_attention,
)
from sdstudio.prompt.parser import parse, parse_prompt_attention
from tests.reference import randomise_, transformers_clip

CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def model():
    m = random_model(CONFIG)
    randomise_(m, seed=11)  # O(1) activations, so differences are visible
    return m


def encode(model, tokenizer, prompt, negative="", clip_skip=1, steps=10, **kw):
    with torch.inference_mode():
        return encode_conditioning(
            model.text_encoder, tokenizer, CONFIG.text, parse(prompt, steps),
            parse(negative, steps, composable=False), clip_skip, **kw,
        )


def chunks_of(text, tokenizer, config=CONFIG.text, **kw):
    return tokenize_attention(parse_prompt_attention(text), tokenizer, config, **kw)


def test_150_tokens_make_two_chunks_and_the_negative_is_padded(model, tokenizer):
    prompt = " ".join(["cat"] * 150)
    assert tokenizer.count(prompt) == 150
    chunks = chunks_of(prompt, tokenizer)
    assert [c.length for c in chunks] == [75, 75]
    assert all(c.tokens[0] == BOS and c.tokens[-1] == EOS and len(c.tokens) == 77 for c in chunks)
    cond = encode(model, tokenizer, prompt, "blurry")
    assert cond.tensors.shape == (2, 154, 32) and cond.texts == (prompt, "blurry")
    # each chunk is encoded on its own: the second 77 equal the encoding of the last 75 tokens alone
    with torch.inference_mode():
        alone = model.text_encoder(torch.tensor(chunk_tokens(tokenizer.encode(prompt)[75:], CONFIG.text)), 1)
        empty = model.text_encoder(torch.tensor(chunk_tokens([], CONFIG.text)), 1)
    torch.testing.assert_close(cond.tensors[0, 77:], alone[0], rtol=0, atol=1e-6)
    # the negative's second chunk is an encoded empty prompt
    torch.testing.assert_close(cond.tensors[1, 77:], empty[0], rtol=0, atol=1e-6)
    assert [c.length for c in chunks_of(prompt + " cat", tokenizer)] == [75, 75, 1]


@pytest.mark.parametrize("preset", ["tiny", "tiny-sd2"])
def test_plain_prompt_is_exactly_the_unweighted_encoding(model, tokenizer, preset):
    """What the pipeline fed the UNet before prompt syntax existed, bit for bit."""
    config = PRESETS[preset]
    m = model if preset == "tiny" else random_model(config)
    with torch.inference_mode():
        cond = encode_conditioning(m.text_encoder, tokenizer, config.text, parse("a red circle, left", 20),
                                   parse("blurry", 20, composable=False), config.text.default_clip_skip)
        ids = [chunk_tokens(tokenizer.encode(t), config.text)[0] for t in cond.texts]
        direct = m.text_encoder(torch.tensor(ids), config.text.default_clip_skip)
    assert cond.texts == ("a red circle, left", "blurry")
    assert torch.equal(cond.tensors, direct)


def test_comma_backtrack_moves_the_last_phrase_to_the_next_chunk(tokenizer):
    words = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)  # 81 tokens, comma at 70
    assert [c.length for c in chunks_of(words, tokenizer)] == [71, 10]
    assert chunks_of(words, tokenizer)[1].tokens[1:11] == tuple(tokenizer.encode(" ".join(["dog"] * 10)))
    assert [c.length for c in chunks_of(words, tokenizer, comma_backtrack=0)] == [75, 6]
    far = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30)  # comma 25 tokens back: no move
    assert [c.length for c in chunks_of(far, tokenizer)] == [75, 6]


def test_break_starts_a_new_chunk_and_sd2_pads_with_zero(tokenizer):
    chunks = chunks_of("a cat BREAK a dog", tokenizer)
    assert [c.length for c in chunks] == [2, 2]
    assert chunks[1].tokens[:4] == (BOS, *tokenizer.encode("a dog"), EOS)
    sd2 = chunks_of("a cat", tokenizer, PRESETS["tiny-sd2"].text)[0]
    assert sd2.tokens[:4] == (BOS, *tokenizer.encode("a cat"), EOS) and set(sd2.tokens[4:]) == {0}
    assert set(chunks[0].tokens[3:]) == {EOS}  # SD 1 pads with EOS


def test_attention_weights_scale_their_tokens_then_restore_the_mean(model, tokenizer):
    """With ``(red:1.5)``: z_w = c * m * z, where z is the unweighted encoding of the same tokens,
    m is 1.5 exactly at the tokens of "red" and 1 elsewhere, and c = mean(z) / mean(m * z) is one
    global factor; so mean(z_w) = mean(z)."""
    plain, weighted = (encode(model, tokenizer, p).tensors[0] for p in ("a photo of red apple", "a photo of (red:1.5) apple"))
    chunk = chunks_of("a photo of (red:1.5) apple", tokenizer)[0]
    red = [i for i, m in enumerate(chunk.multipliers) if m != 1.0]
    assert red == [4] and chunk.tokens[4] == tokenizer.token_for("red") and chunk.multipliers[4] == 1.5
    m = torch.ones(77, 1)
    m[4] = 1.5
    c = plain.mean() / (plain * m).mean()
    assert abs(float(c) - 1.0) > 1e-4  # the rescale is real, not a no-op
    torch.testing.assert_close(weighted, plain * m * c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weighted.mean(), plain.mean(), rtol=1e-6, atol=1e-7)
    outside = [i for i in range(77) if i != 4]
    ratio = weighted[outside] / plain[outside]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(c)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_equals_transformers_hidden_states_plus_final_norm(model, tokenizer, clip_skip):
    hf = transformers_clip(CONFIG, model.state_dict())
    text = getattr(hf, "text_model", hf)
    cond = encode(model, tokenizer, "a red circle", clip_skip=clip_skip)
    ids = torch.tensor([chunk_tokens(tokenizer.encode("a red circle"), CONFIG.text)[0]])
    with torch.inference_mode():
        out = hf(ids, output_hidden_states=True)
        expected = text.final_layer_norm(out.hidden_states[-clip_skip])
    torch.testing.assert_close(cond.tensors[0], expected[0], rtol=0, atol=1e-5)
    if clip_skip == 1:
        torch.testing.assert_close(cond.tensors[0], out.last_hidden_state[0], rtol=0, atol=1e-5)


class RecordingEncoder(nn.Module):
    """The text encoder, recording the token batches it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    @property
    def token_embedding(self):
        return self.inner.token_embedding

    def forward(self, tokens, clip_skip, token_embeds=None):
        self.calls.append(tokens.tolist())
        return self.inner(tokens, clip_skip, token_embeds=token_embeds)


def test_each_distinct_text_is_encoded_once(model, tokenizer):
    recorder = RecordingEncoder(model.text_encoder)
    positive = parse("[cat:dog:4] AND cat :0.5 AND [cat|dog]", 10)
    negative = parse("[dog:bird:2]", 10, composable=False)
    with torch.inference_mode():
        cond = encode_conditioning(recorder, tokenizer, CONFIG.text, positive, negative, 1)
    assert cond.texts == ("cat", "dog", "bird")
    assert len(recorder.calls) == 1 and len(recorder.calls[0]) == 3  # one call, one chunk per text
    assert [c.weight for c in cond.positive] == [1.0, 0.5, 1.0]
    assert cond.positive[0].schedule.end_at_step == (4, 10) and cond.positive[0].schedule.index == (0, 1)
    assert cond.positive[1].schedule.index == (0,)
    assert cond.positive[2].schedule.index == (0, 1) * 5
    assert cond.negative.end_at_step == (2, 10) and cond.negative.index == (1, 2)
    assert [cond.positive[0].schedule.at(s) for s in range(10)] == [0] * 5 + [1] * 5  # A1111: steps 0..4
