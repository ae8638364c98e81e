"""AUTOMATIC1111's styles.csv: reading (quoted CSV, BOM, comments, old layout) and merging into prompts."""

import pytest

from sdstudio.errors import SdStudioError
from sdstudio.prompt.styles import PromptStyle, apply_styles, find_styles, load_styles, merge_prompt


def write(tmp_path, text, name="styles.csv", encoding="utf-8"):
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def test_load_quoted_csv_in_file_order(tmp_path):
    path = write(
        tmp_path,
        "name,prompt,negative_prompt\n"
        '"Cinematic","{prompt}, film grain, (dramatic:1.2)","cartoon, drawing"\n'
        "# notes,ignored,\n"
        ",no name,\n"
        '"Plain", "oil painting", ""\n'
        '"Multi","line one\nline two",\n',
        encoding="utf-8-sig",  # A1111 writes a byte-order mark
    )
    styles = load_styles(path)
    assert list(styles) == ["Cinematic", "Plain", "Multi"]
    assert styles["Cinematic"] == PromptStyle(
        "Cinematic", "{prompt}, film grain, (dramatic:1.2)", "cartoon, drawing"
    )
    assert styles["Plain"] == PromptStyle("Plain", "oil painting", "")
    assert styles["Multi"].prompt == "line one\nline two"


def test_old_name_text_layout_and_empty_file(tmp_path):
    assert load_styles(write(tmp_path, "name,text\nOld,watercolor\n")) == {
        "Old": PromptStyle("Old", "watercolor")
    }
    assert load_styles(write(tmp_path, "", name="empty.csv")) == {}


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(SdStudioError, match=r"nope.csv: no such styles file"):
        load_styles(tmp_path / "nope.csv")
    with pytest.raises(SdStudioError, match="needs a 'name' column"):
        load_styles(write(tmp_path, "title,prompt\nA,b\n"))


@pytest.mark.parametrize(
    ("style", "prompt", "expected"),
    [
        ("{prompt}, masterpiece", "a cat", "a cat, masterpiece"),
        ("photo of {prompt} at night", "a cat", "photo of a cat at night"),
        ("masterpiece", "a cat", "a cat, masterpiece"),
        ("  masterpiece ", " a cat ", "a cat, masterpiece"),
        ("masterpiece", "", "masterpiece"),
        ("", "a cat", "a cat"),
        ("{prompt}", "", ""),
    ],
)
def test_merge_prompt(style, prompt, expected):
    assert merge_prompt(style, prompt) == expected


def test_apply_styles_in_order_to_both_prompts():
    styles = (
        PromptStyle("A", "{prompt}, sharp", "blurry"),
        PromptStyle("B", "art of {prompt}", "{prompt}, ugly"),
    )
    assert apply_styles("a dog", "", styles) == ("art of a dog, sharp", "blurry, ugly")
    assert apply_styles("a dog", "cat", styles[:1]) == ("a dog, sharp", "cat, blurry")
    assert apply_styles("a dog", "cat", ()) == ("a dog", "cat")


def test_find_styles_names_close_matches():
    library = {n: PromptStyle(n) for n in ("Cinematic", "Anime", "Oil painting")}
    assert [s.name for s in find_styles(library, ["Anime", "Cinematic"])] == ["Anime", "Cinematic"]
    with pytest.raises(
        SdStudioError, match=r"unknown style 'cinematik' in s.csv; did you mean 'Cinematic'\?"
    ):
        find_styles(library, ["cinematik"], source="s.csv")
    with pytest.raises(
        SdStudioError, match=r"unknown style 'zzz' \(it has 3: Cinematic, Anime, Oil painting\)"
    ):
        find_styles(library, ["zzz"])


def test_generate_applies_styles_into_the_prompt_and_infotext(tmp_path, capsys):
    from PIL import Image

    from sdstudio.cli import main

    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nteal,"{prompt}, teal background",blurry\n')
    out = tmp_path / "a.png"
    args = ["generate", "a red circle", "--steps", "3", "--seed", "1", "--styles", str(styles), "-q"]
    assert main([*args, "--style", "teal", "-o", str(out)]) == 0
    text = Image.open(out).info["parameters"]
    assert text.startswith("a red circle, teal background\nNegative prompt: blurry\n")
    assert main([*args, "--style", "tael", "-o", str(tmp_path / "b.png")]) == 2
    assert "teal" in capsys.readouterr().err  # the close name is offered
    assert not (tmp_path / "b.png").exists()
    assert main(["generate", "x", "--style", "teal", "-o", str(tmp_path / "c.png"), "-q"]) == 2
    assert "--style needs --styles" in capsys.readouterr().err
