from sdstudio.io.infotext import format_infotext, parse_infotext, quote

A1111_SAMPLE = (
    "a photo of a cat, (masterpiece:1.2)\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1'
)


def test_parse_a1111_sample():
    prompt, negative, params = parse_infotext(A1111_SAMPLE)
    assert prompt == "a photo of a cat, (masterpiece:1.2)"
    assert negative == "blurry, lowres"
    assert params == {
        "Steps": "20",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7",
        "Seed": "1234",
        "Size": "512x768",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Lora hashes": "add_detail: 7c6bad76eb54",
        "Version": "v1.10.1",
    }


def test_format_round_trip_and_layout():
    params = {"Steps": 20, "Sampler": "Euler a", "CFG scale": "7.5", "Seed": 1, "Size": "64x64", "Note": "a, b: c"}
    text = format_infotext("line one\nline two", "bad", params)
    assert text.splitlines()[2] == "Negative prompt: bad"
    assert text.splitlines()[3].startswith("Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 64x64")
    prompt, negative, parsed = parse_infotext(text)
    assert (prompt, negative) == ("line one\nline two", "bad")
    assert parsed == {k: str(v) for k, v in params.items()}


def test_no_negative_line_and_none_values_dropped():
    text = format_infotext("p", "", {"Steps": 5, "Sampler": "Euler", "Clip skip": None, "Seed": 3})
    assert text == "p\nSteps: 5, Sampler: Euler, Seed: 3"


def test_quote():
    assert quote("plain") == "plain"
    assert quote("a, b") == '"a, b"'
    assert quote('say "hi"') == '"say \\"hi\\""'
