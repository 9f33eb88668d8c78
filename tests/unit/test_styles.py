"""styles.csv is read like A1111 reads it, applied like A1111 applies it, and written back safely."""
from __future__ import annotations

import csv
import os
import threading

import pytest

from modules.prompting.styles import (
    PromptStyle,
    StyleDatabase,
    UnknownStyleError,
    merge_prompts,
)

A1111_FILE = (
    "\ufeffname,prompt,negative_prompt\r\n"
    '"Cinematic","cinematic still of {prompt}, film grain","cartoon, painting"\r\n'
    'Quality,"masterpiece, best quality","lowres, bad anatomy"\r\n'
    '"#### Dividers ####",,\r\n'
    'Multi,"line one\nline two",\r\n'
    'Empty,,\r\n'
)


@pytest.fixture
def styles_file(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(A1111_FILE, encoding="utf-8", newline="")
    return path


def test_reads_a1111_file_with_bom_quotes_and_comment_rows(styles_file):
    db = StyleDatabase(styles_file)
    assert db.names() == ["Cinematic", "Quality", "Multi", "Empty"]
    cinematic = db.get("Cinematic")
    assert cinematic == PromptStyle("Cinematic", "cinematic still of {prompt}, film grain", "cartoon, painting")
    assert db.get("Multi").prompt == "line one\nline two"
    assert db.get("#### Dividers ####") is None
    assert db.get("missing") is None


def test_missing_file_is_an_empty_database(tmp_path):
    db = StyleDatabase(tmp_path / "nope.csv")
    assert db.names() == []
    assert db.api_list() == []
    assert db.apply("p", "n", []) == ("p", "n")


def test_extra_columns_short_rows_and_legacy_text_column(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text("name,text,notes\nOld,old prompt,keep me\nShort\n", encoding="utf-8")
    db = StyleDatabase(path)
    assert db.get("Old") == PromptStyle("Old", "old prompt", "", {"notes": "keep me"})
    assert db.get("Short") == PromptStyle("Short", "", "", {"notes": ""})


def test_api_list_shape(styles_file):
    listed = StyleDatabase(styles_file).api_list()
    assert listed[0] == {
        "name": "Cinematic",
        "prompt": "cinematic still of {prompt}, film grain",
        "negative_prompt": "cartoon, painting",
    }
    assert [entry["name"] for entry in listed] == ["Cinematic", "Quality", "Multi", "Empty"]
    assert all(set(entry) == {"name", "prompt", "negative_prompt"} for entry in listed)


@pytest.mark.parametrize(
    ("style", "prompt", "expected"),
    [
        ("masterpiece", "a cat", "a cat, masterpiece"),
        ("masterpiece", "", "masterpiece"),
        ("masterpiece", "  a cat  ", "a cat, masterpiece"),
        ("", "a cat", "a cat"),
        ("  ", "  a cat ", "a cat"),
        ("photo of {prompt}, 8k", "a cat", "photo of a cat, 8k"),
        ("photo of {prompt}, 8k", "", "photo of , 8k"),
        ("{prompt} and {prompt}", "x", "x and x"),
    ],
)
def test_merge_prompts_follows_a1111(style, prompt, expected):
    assert merge_prompts(style, prompt) == expected


def test_apply_in_order_to_both_prompts(styles_file):
    db = StyleDatabase(styles_file)
    assert db.apply("a cat", "dog", ["Quality"]) == (
        "a cat, masterpiece, best quality",
        "dog, lowres, bad anatomy",
    )
    assert db.apply("a cat", "", ["Cinematic", "Quality"]) == (
        "cinematic still of a cat, film grain, masterpiece, best quality",
        "cartoon, painting, lowres, bad anatomy",
    )
    assert db.apply("a cat", "dog", ["Quality", "Cinematic"])[0] == (
        "cinematic still of a cat, masterpiece, best quality, film grain"
    )
    assert db.apply("a cat", "dog", ["Empty"]) == ("a cat", "dog")
    assert db.apply("a cat", "dog", None) == ("a cat", "dog")


def test_unknown_styles_raise_listing_all_of_them(styles_file):
    db = StyleDatabase(styles_file)
    with pytest.raises(UnknownStyleError) as info:
        db.apply("p", "n", ["Quality", "Nope", "#### Dividers ####"])
    assert info.value.names == ["Nope", "#### Dividers ####"]
    assert "'Nope'" in str(info.value) and "'#### Dividers ####'" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_save_adds_and_replaces_in_place_keeping_comments_and_extras(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text("name,prompt,negative_prompt,author\nA,a,,me\n# divider,,,\nB,b,,you\n", encoding="utf-8")
    db = StyleDatabase(path)
    db.save(PromptStyle("A", "new a", "neg a", {"author": "me"}))
    db.save(PromptStyle("C", "c, with comma", 'quote " inside'))
    assert db.names() == ["A", "B", "C"]

    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["A", "# divider", "B", "C"]
    assert rows[0] == {"name": "A", "prompt": "new a", "negative_prompt": "neg a", "author": "me"}
    assert rows[2]["author"] == "you"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # BOM, as A1111 writes

    reread = StyleDatabase(path)
    assert reread.get("C") == PromptStyle("C", "c, with comma", 'quote " inside', {"author": ""})
    assert reread.names() == db.names()


def test_save_refuses_bad_names(tmp_path):
    db = StyleDatabase(tmp_path / "styles.csv")
    for bad in ("", "   ", "#comment"):
        with pytest.raises(ValueError):
            db.save(PromptStyle(bad, "x"))
    assert not (tmp_path / "styles.csv").exists()


def test_delete(styles_file):
    db = StyleDatabase(styles_file)
    db.delete("Quality")
    assert db.names() == ["Cinematic", "Multi", "Empty"]
    assert StyleDatabase(styles_file).names() == ["Cinematic", "Multi", "Empty"]
    assert "#### Dividers ####" in styles_file.read_text(encoding="utf-8-sig")
    with pytest.raises(UnknownStyleError):
        db.delete("Quality")


def test_writes_are_atomic_and_leave_no_temp_files(styles_file, monkeypatch):
    db = StyleDatabase(styles_file)
    before = styles_file.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        db.save(PromptStyle("New", "x"))
    assert styles_file.read_bytes() == before
    assert db.names() == ["Cinematic", "Quality", "Multi", "Empty"]  # memory unchanged too
    assert sorted(os.listdir(styles_file.parent)) == ["styles.csv"]


def test_reload_sees_outside_edits(styles_file):
    db = StyleDatabase(styles_file)
    styles_file.write_text("name,prompt,negative_prompt\nOnly,o,\n", encoding="utf-8")
    assert "Only" not in db.names()
    db.reload()
    assert db.names() == ["Only"]


def test_duplicate_names_keep_first_place_and_last_values(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text("name,prompt,negative_prompt\nA,first,\nB,b,\nA,second,\n", encoding="utf-8")
    db = StyleDatabase(path)
    assert db.names() == ["A", "B"]
    assert db.get("A").prompt == "second"


def test_concurrent_saves_lose_nothing(tmp_path):
    db = StyleDatabase(tmp_path / "styles.csv")
    errors: list[BaseException] = []

    def worker(index: int):
        try:
            for j in range(5):
                db.save(PromptStyle(f"s{index}-{j}", f"prompt {index} {j}"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(StyleDatabase(tmp_path / "styles.csv").names()) == 20


def test_extract_takes_applied_styles_back_out(tmp_path):
    """A pasted infotext's "Styles array": the styles' text leaves the prompts and the styles are selected;
    a style whose text is not in them (edited since) is not selected."""
    from modules.prompting.styles import StyleDatabase, unmerge_prompts
    db = StyleDatabase(tmp_path / "styles.csv")
    db.save(PromptStyle("warm", "oil painting, warm light", "ugly"))
    db.save(PromptStyle("frame", "a photo of {prompt}, framed", ""))
    prompt, negative = db.apply("a fox", "blurry", ["warm", "frame"])
    assert (prompt, negative) == ("a photo of a fox, oil painting, warm light, framed", "blurry, ugly")
    assert db.extract(prompt, negative, ["warm", "frame"]) == ("a fox", "blurry", ["warm", "frame"])
    assert db.extract("a fox", "blurry", ["warm"]) == ("a fox", "blurry", [])
    assert db.extract(prompt, negative, ["unknown"]) == (prompt, negative, [])
    assert unmerge_prompts("", " x ") == "x" and unmerge_prompts("style", "style") == ""
