"""Exact parity of the prompt parser with AUTOMATIC1111's webui (modules/prompt_parser.py,
modules/extra_networks.py). Expected values follow A1111's code paths; the cases marked "doctest"
are A1111's own doctests and docstring examples."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdstudio.prompt.parser import (
    ExtraNetworkTag,
    ParsedPrompt,
    ScheduledPrompt,
    extract_extra_networks,
    parse,
    parse_prompt_attention,
    schedules,
    split_and,
    to_json_dict,
)


def _alternating(texts: list[str], steps: int) -> list[tuple[int, str]]:
    return [(step, texts[(step - 1) % len(texts)]) for step in range(1, steps + 1)]


_LANDSCAPE = (
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
    "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
)

# (prompt, steps, hires_steps, expected [(end_at_step, text), ...])
SCHEDULE_CASES: list[tuple[str, int, int | None, list[tuple[int, str]]]] = [
    # A1111 doctests (get_learned_conditioning_prompt_schedules, steps=10)
    ("test", 10, None, [(10, "test")]),
    ("a [b:3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, None, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, None, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, None, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, None, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, None, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 10, None, _alternating(["a", "(b:1.1)"], 10)),
    ("[fe|]male", 10, None, _alternating(["female", "male"], 10)),
    ("[fe|||]male", 10, None, _alternating(["female", "male", "male", "male"], 10)),
    ("a [b:.5] c", 10, 10, [(10, "a b c")]),
    ("a [b:1.5] c", 10, 10, [(5, "a  c"), (10, "a b c")]),
    # A1111's doctest says [[5, 'a  c'], [10, 'a {b|d{ c']], but that doctest is stale: since "|"
    # became the alternation separator the grammar rejects this prompt, and the code returns it whole.
    ("a [{b|d{:.5] c", 10, None, [(10, "a [{b|d{:.5] c")]),
    # the example at the top of A1111's prompt_parser.py, steps=100
    (
        _LANDSCAPE,
        100,
        None,
        [
            (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
            (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
            (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
            (75, "fantasy landscape with a lake and an oak in background masterful"),
            (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
        ],
    ),
    # get_learned_conditioning's docstring example
    (
        "a [blue:green:5] jeweled crown",
        20,
        None,
        [(5, "a blue jeweled crown"), (20, "a green jeweled crown")],
    ),
    # when: fractions (written with a ".") are int(when * steps); other numbers are step numbers
    ("[a:b:0.5]", 20, None, [(10, "a"), (20, "b")]),
    ("[a:b:0.33]", 10, None, [(3, "a"), (10, "b")]),
    ("[a:b:0.99]", 7, None, [(6, "a"), (7, "b")]),
    ("[a:b:1.0]", 10, None, [(10, "a")]),  # "1.0" is the whole run, "1" is step 1
    ("[a:b:1]", 10, None, [(1, "a"), (10, "b")]),
    ("[a:b:2.]", 10, None, [(10, "a")]),
    ("[a:b:25]", 20, None, [(20, "a")]),
    ("[a:b:0]", 10, None, [(10, "b")]),
    ("[a:b:-3]", 10, None, [(10, "b")]),
    ("[a:b:+2]", 10, None, [(2, "a"), (10, "b")]),
    ("[a:b:0.04]", 20, None, [(20, "b")]),
    ("[a:b:1e1]", 20, None, [(10, "a"), (20, "b")]),  # no "." so a step number
    ("[a:b:5e-1]", 10, None, [(10, "b")]),  # 0.5 as a step number truncates to 0
    ("[a:b:2.5e-1]", 20, None, [(5, "a"), (20, "b")]),
    ("[a:b: 3 ]", 10, None, [(3, "a"), (10, "b")]),
    ("[a:b:\t2\n]", 10, None, [(2, "a"), (10, "b")]),
    # [to:when], [from::when], empty parts
    ("[:b:3]", 10, None, [(3, ""), (10, "b")]),
    ("[a::3]", 10, None, [(3, "a"), (10, "")]),
    ("x[ in foreground::0.6]", 10, None, [(6, "x in foreground"), (10, "x")]),
    # not editing syntax: kept literally
    ("[a:b:3x]", 10, None, [(10, "[a:b:3x]")]),
    ("[a:b:c:3]", 10, None, [(10, "[a:b:c:3]")]),
    ("[a:b]", 10, None, [(10, "[a:b]")]),
    ("[a:b:3", 10, None, [(10, "[a:b:3")]),
    ("[a:b:\u0663]", 10, None, [(10, "[a:b:\u0663]")]),  # lark's NUMBER is ASCII digits only
    ("\\[a:b:2\\]", 10, None, [(10, "\\[a:b:2\\]")]),  # escapes stay for the attention parser
    ("[a\\:b:2]", 10, None, [(2, ""), (10, "a\\:b")]),
    ("[]", 10, None, [(10, "[]")]),
    # the whole prompt is literal where A1111's grammar fails anywhere
    ("a | b", 10, None, [(10, "a | b")]),
    ("[a:b:3] | c", 10, None, [(10, "[a:b:3] | c")]),
    ("(a|b) [c:d:2]", 10, None, [(10, "(a|b) [c:d:2]")]),
    ("[a|b:3]", 10, None, [(10, "[a|b:3]")]),
    ("[b:c:2] a\\", 10, None, [(10, "[b:c:2] a\\")]),
    ("a\\\n[b:c:2]", 10, None, [(10, "a\\\n[b:c:2]")]),
    # stray brackets around a valid edit
    ("[x:[a:b:2]", 10, None, [(2, "[x:a"), (10, "[x:b")]),
    ("(a:[b:c:3]", 10, None, [(3, "(a:b"), (10, "(a:c")]),
    ("a\n[b:c:2]", 10, None, [(2, "a\nb"), (10, "a\nc")]),
    # nesting: edits in edits, alternation in edits, edits in emphasis
    ("[[a:b:2]:[c:d:4]:3]", 10, None, [(2, "a"), (3, "b"), (4, "c"), (10, "d")]),
    ("[[a|b]:c:4]", 6, None, [(1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, "c"), (6, "c")]),
    ("(a [b:c:2]:1.2)", 4, None, [(2, "(a b:1.2)"), (4, "(a c:1.2)")]),
    ("([x:y:2]:1.3)", 4, None, [(2, "(x:1.3)"), (4, "(y:1.3)")]),
    # alternation
    ("[a|b|c]", 4, None, [(1, "a"), (2, "b"), (3, "c"), (4, "a")]),
    ("[a|[b|c]]", 4, None, [(1, "a"), (2, "c"), (3, "a"), (4, "c")]),  # inner uses the global step
    ("x[|]y", 3, None, [(1, "xy"), (2, "xy"), (3, "xy")]),
    ("[a|b]", 1, None, [(1, "a")]),
    # hires-fix second pass (base steps, hires steps): integers count from the end of the first
    # pass, fractions span both passes
    ("[a:b:5]", 10, 10, [(10, "b")]),
    ("[a:b:15]", 10, 20, [(5, "a"), (20, "b")]),
    ("[a:b:0.5]", 20, 10, [(10, "b")]),
    ("[a:b:1.25]", 20, 8, [(2, "a"), (8, "b")]),
    ("[a|b]", 10, 3, [(1, "a"), (2, "b"), (3, "a")]),
]


@pytest.mark.parametrize(("prompt", "steps", "hires_steps", "expected"), SCHEDULE_CASES)
def test_schedules(prompt: str, steps: int, hires_steps: int | None, expected: list[tuple[int, str]]) -> None:
    assert schedules(prompt, steps, hires_steps) == [ScheduledPrompt(step, text) for step, text in expected]


def test_ambiguous_grammar_takes_the_edit() -> None:
    # A1111's lark grammar is ambiguous for an edit followed directly by a stray ":" / "(" / ")";
    # lark's choice depends on the process's string-hash seed. We always take the edit.
    assert schedules("[x:y:2]:", 10) == [ScheduledPrompt(2, "x:"), ScheduledPrompt(10, "y:")]
    assert schedules("[x:y:2])", 10) == [ScheduledPrompt(2, "x)"), ScheduledPrompt(10, "y)")]


_HOUSE = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."

# (text, expected [(fragment, weight), ...]); weights compared exactly, as A1111's floats
ATTENTION_CASES: list[tuple[str, list[tuple[str, float]]]] = [
    # A1111 doctests (parse_prompt_attention)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        _HOUSE,
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # our cases
    ("", [("", 1.0)]),
    ("[x]", [("x", 0.9090909090909091)]),
    ("[[x]]", [("x", 0.8264462809917354)]),
    ("((x))", [("x", 1.2100000000000002)]),
    ("(((x)))", [("x", 1.3310000000000004)]),
    ("(x:1.3)", [("x", 1.3)]),
    ("(x: 1.3 )", [("x", 1.3)]),
    ("(x:0)", [("x", 0.0)]),
    ("(x:-1)", [("x", -1.0)]),
    ("((x:1.5))", [("x", 1.6500000000000001)]),
    ("[x:1.3]", [("x:1.3", 0.9090909090909091)]),  # explicit weights only in round brackets
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
    ("((x)[y])", [("x", 1.2100000000000002), ("y", 1.0)]),
    ("(a[b", [("a", 1.1), ("b", 1.0)]),  # unclosed: round multipliers first, then square
    ("a)", [("a)", 1.0)]),
    ("a]b[", [("a]b", 1.0)]),
    ("(x:1.2)y:2)", [("x", 1.2), ("y:2)", 1.0)]),
    ("\\(x:1.5\\)", [("(x:1.5)", 1.0)]),
    ("\\\\", [("\\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash before an ordinary character vanishes
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111 multiplies BREAK too
    ("a:b", [("a:b", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_CASES)
def test_parse_prompt_attention(text: str, expected: list[tuple[str, float]]) -> None:
    result = parse_prompt_attention(text)
    assert result == expected
    assert all(type(weight) is float for _, weight in result)


# A1111 raises ValueError on these; we keep the text and close the bracket normally.
@pytest.mark.parametrize(
    ("text", "expected"),
    [("(x:1.2.3)", [("x:1.2.3", 1.1)]), ("a (b:.) c", [("a ", 1.0), ("b:.", 1.1), (" c", 1.0)])],
)
def test_attention_weight_that_a1111_rejects(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


AND_CASES: list[tuple[str, list[tuple[str, float]]]] = [
    ("a AND b", [("a", 1.0), (" b", 1.0)]),
    ("a :1.2 AND b:0.5", [("a", 1.2), (" b", 0.5)]),
    ("a AND b :-1", [("a", 1.0), (" b", -1.0)]),
    ("ANDROID AND", [("ANDROID", 1.0), ("", 1.0)]),
    ("a and b", [("a and b", 1.0)]),
    ("x_AND_y", [("x_AND_y", 1.0)]),
    ("(a:1.2)", [("(a:1.2)", 1.0)]),
    ("cat:2.", [("cat", 2.0)]),
    ("a:.5 ", [("a", 0.5)]),
    ("a: 1.5x", [("a: 1.5x", 1.0)]),
    ("a:1:2", [("a:1", 2.0)]),
    ("a\nAND\nb:3", [("a", 1.0), ("\nb", 3.0)]),
    ("  a  ", [("  a", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), AND_CASES)
def test_split_and(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert split_and(prompt) == expected


EXTRA_NETWORK_CASES: list[tuple[str, str, list[tuple[str, tuple[str, ...]]]]] = [
    ("<lora:name:0.8> a cat", " a cat", [("lora", ("name", "0.8"))]),
    ("<lora:name:0.8:0.5>", "", [("lora", ("name", "0.8", "0.5"))]),
    ("<hypernet:name:1>, <lora:x:1>", ", ", [("hypernet", ("name", "1")), ("lora", ("x", "1"))]),
    ("a <lora:x> b", "a  b", [("lora", ("x",))]),
    ("<lora:a:b:>", "", [("lora", ("a", "b", ""))]),
    ("<lora:x:1>(cat)<lora:y:0.5>", "(cat)", [("lora", ("x", "1")), ("lora", ("y", "0.5"))]),
    ("<lora:>", "<lora:>", []),
    ("<lo ra:x:1>", "<lo ra:x:1>", []),
    ("<lora:x:1", "<lora:x:1", []),
    ("a < b > c", "a < b > c", []),
]


@pytest.mark.parametrize(("prompt", "rest", "tags"), EXTRA_NETWORK_CASES)
def test_extract_extra_networks(prompt: str, rest: str, tags: list[tuple[str, tuple[str, ...]]]) -> None:
    assert extract_extra_networks(prompt) == (rest, [ExtraNetworkTag(kind, args) for kind, args in tags])


_FULL = "<lora:x:0.8> a [cat:dog:0.5] AND (b:1.2) :0.7"


def test_parse_to_json_dict() -> None:
    parsed = parse(_FULL, 4)
    assert parsed.hires is None
    assert to_json_dict(parsed) == {
        "prompt_after_extra_networks": " a [cat:dog:0.5] AND (b:1.2) :0.7",
        "extra_networks": [["lora", ["x", "0.8"]]],
        "subprompts": [
            {
                "text": " a [cat:dog:0.5]",
                "weight": 1.0,
                "schedule": [
                    {"end_at_step": 2, "text": " a cat", "attention": [[" a cat", 1.0]]},
                    {"end_at_step": 4, "text": " a dog", "attention": [[" a dog", 1.0]]},
                ],
            },
            {
                "text": " (b:1.2)",
                "weight": 0.7,
                "schedule": [{"end_at_step": 4, "text": " (b:1.2)", "attention": [[" ", 1.0], ["b", 1.2]]}],
            },
        ],
    }


def test_parse_hires_variant() -> None:
    parsed = parse(_FULL, 4, hires_steps=6)
    assert parsed.hires is not None and parsed.hires.hires is None
    assert parsed.hires.extra_networks == parsed.extra_networks
    first, second = parsed.hires.subprompts
    assert [(e.end_at_step, e.text) for e in first.schedule] == [(6, " a dog")]  # 0.5 ended in pass one
    assert [(e.end_at_step, e.text) for e in second.schedule] == [(6, " (b:1.2)")]
    assert (first.weight, second.weight) == (1.0, 0.7)
    # the first pass is unaffected by asking for a second
    assert dataclasses.replace(parsed, hires=None) == parse(_FULL, 4)


def test_parse_not_composable_keeps_and() -> None:
    parsed = parse("a AND b:2", 10, composable=False)
    assert [(s.text, s.weight) for s in parsed.subprompts] == [("a AND b:2", 1.0)]


def test_attention_is_per_scheduled_text() -> None:
    (sub,) = parse("[(a:1.5)|[b]]", 2).subprompts
    assert [entry.attention for entry in sub.schedule] == [
        (("a", 1.5),),
        (("b", 0.9090909090909091),),
    ]


def test_json_shape_types_and_round_trip() -> None:
    parsed = parse("<hypernet:h:1> (a:1.1) [b|c] BREAK d AND e", 3, hires_steps=2)
    for variant in (parsed, parsed.hires):
        assert variant is not None
        data = to_json_dict(variant)
        assert json.loads(json.dumps(data)) == data
        assert list(data) == ["prompt_after_extra_networks", "extra_networks", "subprompts"]
        for kind, args in data["extra_networks"]:
            assert isinstance(kind, str) and all(isinstance(a, str) for a in args)
        for sub in data["subprompts"]:
            assert list(sub) == ["text", "weight", "schedule"]
            assert isinstance(sub["text"], str) and isinstance(sub["weight"], float)
            for entry in sub["schedule"]:
                assert list(entry) == ["end_at_step", "text", "attention"]
                assert isinstance(entry["end_at_step"], int) and isinstance(entry["text"], str)
                for fragment, weight in entry["attention"]:
                    assert isinstance(fragment, str) and isinstance(weight, float)
    assert to_json_dict(parsed)["subprompts"][0]["schedule"][0]["attention"] == [
        [" ", 1.0],
        ["a", 1.1],
        [" b", 1.0],
        ["BREAK", -1.0],
        ["d", 1.0],
    ]


def test_results_are_frozen() -> None:
    parsed = parse("a", 1)
    assert isinstance(parsed, ParsedPrompt)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.subprompts = ()  # type: ignore[misc]


def test_deep_nesting_does_not_recurse() -> None:
    depth = 5000
    assert schedules("[" * depth + "a:b:1" + "]" * depth, 3) == [
        ScheduledPrompt(1, "[" * (depth - 1) + "a" + "]" * (depth - 1)),
        ScheduledPrompt(3, "[" * (depth - 1) + "b" + "]" * (depth - 1)),
    ]
    nested_edits = "[a:" * depth + "b" + ":1]" * depth
    assert schedules(nested_edits, 2) == [ScheduledPrompt(1, "a"), ScheduledPrompt(2, "b")]


def test_parser_does_not_import_torch() -> None:
    code = "import sys, sdstudio.prompt.parser; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


_SYNTAX = st.lists(
    st.sampled_from(
        [*"ab \n\t[]()[]:|\\.0123456789-e<>", " AND ", "BREAK", "<lora:x:1>", ":0.5]", "(x:1.2)"]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.one_of(st.text(max_size=60), _SYNTAX),
    steps=st.integers(min_value=0, max_value=40),
    hires_steps=st.one_of(st.none(), st.integers(min_value=1, max_value=30)),
)
def test_parse_never_raises(prompt: str, steps: int, hires_steps: int | None) -> None:
    parsed = parse(prompt, steps, hires_steps)
    json.dumps(to_json_dict(parsed))
    for variant, total in ((parsed, steps), (parsed.hires, hires_steps)):
        if variant is None:
            continue
        assert len(variant.subprompts) >= 1
        for sub in variant.subprompts:
            ends = [entry.end_at_step for entry in sub.schedule]
            assert ends == sorted(set(ends)) and ends[-1] == total


_PLAIN = st.text(
    alphabet=st.characters(blacklist_characters="\\()[]:|<", blacklist_categories=("Cs",)), max_size=60
).filter(lambda text: "BREAK" not in text and "AND" not in text)


@settings(max_examples=300, deadline=None)
@given(prompt=_PLAIN, steps=st.integers(min_value=1, max_value=50))
def test_plain_prompt_fragments_rejoin(prompt: str, steps: int) -> None:
    (sub,) = parse(prompt, steps).subprompts
    assert sub.weight == 1.0 and prompt.startswith(sub.text) and not prompt[len(sub.text) :].strip()
    (entry,) = sub.schedule
    assert (entry.end_at_step, entry.text) == (steps, sub.text)
    assert "".join(fragment for fragment, _ in entry.attention) == sub.text
    assert all(weight == 1.0 for _, weight in entry.attention)
