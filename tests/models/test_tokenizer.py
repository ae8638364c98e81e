"""Our tokenizer against CLIP's reference ``SimpleTokenizer`` and its ``bpe_simple_vocab_16e6.txt.gz``.

The reference is the copy that the ``open-clip-torch`` wheel ships (installed with ``--no-deps``); its
module is loaded from its file so that the package ``__init__`` (which imports torchvision) never runs.
It differs from OpenAI's original only in its special-token strings (``<start_of_text>`` instead of
``<|startoftext|>``), so prompts holding those literals are checked separately.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdstudio.models.tokenizer import BOS, CHUNK, EOS, ClipTokenizer, clean, split_words

INSTALL_HINT = "pip install --no-deps open-clip-torch==3.3.0 && pip install ftfy regex"


def _load_reference_module() -> ModuleType:
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the reference tokenizer needs open-clip-torch: {INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_reference_clip_tokenizer", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():  # open_clip's SimpleTokenizer
    module = _load_reference_module()
    tokenizer = module.SimpleTokenizer()
    assert Path(module.default_bpe()).name == "bpe_simple_vocab_16e6.txt.gz"
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.vocab_size) == (BOS, EOS, 49408)
    return tokenizer


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return ClipTokenizer()


PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF AN ASTRONAUT RIDING A HORSE ON MARS",
    "masterpiece, best quality, (detailed face:1.2), [blurry], ((sharp focus)), <lora:foo:0.8>",
    "(red:1.3) AND (blue:0.7) [cat:dog:0.5] {braces} \\(escaped\\)",
    "portrait of a woman, trending on artstation, 8k, 4K UHD, f/1.8, 35mm, ISO-100, 1920x1080",
    "Café crème brûlée, naïve façade, jalapeño, Ångström, Øresund, Straße, İstanbul, ΣΟΦΙΑ",
    "日本の桜、富士山 and 北京烤鸭; 한국어 문장; русский текст; العربية; हिन्दी",
    "emoji 🐱🚀✨ 👩‍👩‍👧 🇫🇷 ❤️ zero\u200bwidth",
    "tom &amp; jerry &lt;3 &quot;quoted&quot; &amp;amp; &#39;x&#39; &eacute;t&eacute; &nbsp;nbsp",
    "“smart quotes” and ‘single’ — em–dash… ﬁnal ﬂower ＦＵＬＬＷＩＤＴＨ",
    "mojibake: cafÃ© â€œhelloâ€\x9d",
    "   extra    whitespace\t\ttabs\nnewlines\r\n  and\u00a0nbsp\u3000ideographic   ",
    "numbers 1234567890 3.14159 -42 1e10 ½ ² ⅷ ٣ ๔",
    "it's they're we've I'm you'll he'd don't CAN'T O'Neil rock'n'roll ''quoted''",
    "punctuation!!! ??? ... ,,, ;; :: -- __ ** ## @@ $$ %% ^^ && || ~~ `` \"\" '' <> [] {} ()",
    "snake_case_name camelCaseName kebab-case-name path/to/file.png http://example.com?a=1&b=2",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "combining: e\u0301 a\u0308 n\u0303 i\u0307 x\u0345y α\u0345 ᾳ",
    "",
    "    ",
    "!",
    # 192 tokens: more than two 77-token windows
    " ".join(["a highly detailed fantasy landscape with castles, dragons and a sunset"] * 16),
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_reference(ours: ClipTokenizer, reference, prompt: str) -> None:
    assert ours.encode(prompt) == reference.encode(prompt)


def test_long_prompt_is_not_truncated(ours: ClipTokenizer, reference) -> None:
    prompt = PROMPTS[-1]
    ids = ours.encode(prompt)
    assert len(ids) > 2 * (CHUNK + 2)
    assert ids == reference.encode(prompt)


# A mix of scripts, marks, digits, symbols, emoji pieces and whitespace, all assigned in Unicode 14
# (so Python's unicodedata and the regex module agree on every class). No special-token literals (the
# reference's differ from OpenAI's, tested below) and no long s, whose "'ſ" is a documented difference.
_ALPHABET = list(
    "aAbBzZ09 '\"!?.,;:()[]{}<>|&#_-+*/\\@$%^~`\t\n"
    "éÉßøÅçñİıΣσςΩЖжё日本語한글عربיहि\u0301\u0308\u0307\u0345\u200b\u200d\u00a0\u3000\x1c"
    "½²٣ⅷ🐱🚀✨❤\ufe0f“”‘’—…ﬁＡｂ１"
) + ["&amp;", "&lt;", "&#39;", "&eacute;", "'s", "'ll", "'re", "'T", "â€œ", "Ã©"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.sampled_from(_ALPHABET), max_size=40))
def test_random_text_equals_reference(ours: ClipTokenizer, reference, pieces: list[str]) -> None:
    text = "".join(pieces)
    assert ours.encode(text) == reference.encode(text), repr(text)


def test_openai_special_strings(ours: ClipTokenizer, reference) -> None:
    # OpenAI's SimpleTokenizer (and transformers' CLIPTokenizer) map these literals to BOS / EOS.
    assert ours.encode("<|endoftext|>") == [EOS]
    assert ours.encode("<|EndOfText|>") == [EOS]  # matched after lowercasing
    cat, dog = reference.encode("cat"), reference.encode("dog")
    assert ours.encode("cat<|startoftext|>dog <|endoftext|>") == cat + [BOS] + dog + [EOS]
    # A run of punctuation swallows the "<|", so this is no special token, in either implementation.
    assert ours.encode("cat!<|endoftext|>") == reference.encode("cat!<|endoftext|>")
    # open_clip's (and instant-clip-tokenizer's) own special literal is ordinary text for OpenAI's.
    assert ours.encode("<start_of_text>") == reference.encode("< start _ of _ text >")
    assert BOS not in ours.encode("<start_of_text>")


def test_clean_and_split_words() -> None:
    assert clean("  Tom &amp;amp; JERRY\n\t“hi”  ") == 'tom & jerry "hi"'
    assert list(split_words("it's a cat!!! 123 <|endoftext|>")) == [
        "it", "'s", "a", "cat", "!!!", "1", "2", "3", "<|endoftext|>"
    ]  # fmt: skip


def test_decode(ours: ClipTokenizer, reference) -> None:
    ids = ours.encode("A photo of a cat, 8k!")
    assert ours.decode(ids) == reference.decode(ids) == "a photo of a cat , 8 k ! "
    assert ours.decode([BOS, *ours.encode("hi"), EOS]) == "<|startoftext|>hi <|endoftext|>"
    with pytest.raises(ValueError):
        ours.decode([49408])


def test_constants_and_helpers(ours: ClipTokenizer, reference) -> None:
    assert (ours.BOS, ours.EOS, ours.CHUNK, ours.vocab_size) == (49406, 49407, 75, 49408)
    assert ours.token_for("cat") == reference.encode("cat")[0] == 2368
    assert ours.token_for("  CAT ") == 2368
    assert ours.token_for("a photo") is None
    assert ours.token_for("") is None
    assert ours.count("a photo of a cat") == 5
