import json
import sys

import pytest

from diffmem.errors import DiffmemError
from diffmem.text import clip_tokenizer
from diffmem.text.clip_tokenizer import clip_tokenizer_files, load_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_clip_tokenizer(tmp_path_factory.mktemp("cache"))


def test_known_openai_ids(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_bpe_splits_long_words_and_lowercases(tokenizer):
    assert tokenizer.tokenize("Supercalifragilistic") == tokenizer.tokenize("supercalifragilistic")
    assert len(tokenizer.tokenize("supercalifragilistic")) > 1
    assert tokenizer.tokenize("it's 42!") == ["it</w>", "'s</w>", "4</w>", "2</w>", "!</w>"]


def test_special_tokens_and_sizes(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.bos_token_id == 49406
    assert tokenizer.eos_token == tokenizer.unk_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 49407
    assert tokenizer.model_max_length == 77


def test_long_prompt_truncates_and_short_prompt_pads(tokenizer):
    long = tokenizer(
        "word " * 200, padding="max_length", truncation=True, max_length=tokenizer.model_max_length
    )
    assert len(long.input_ids) == 77
    assert long.input_ids[0] == 49406 and long.input_ids[-1] == 49407
    short = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert short[:4] == [49406, 320, 2368, 49407]
    assert short[4:] == [49407] * 73


def test_pad_token_can_be_changed(tmp_path):
    tokenizer = load_clip_tokenizer(tmp_path, pad_token="!")
    assert tokenizer.pad_token_id == 0
    assert len(tokenizer) == 49408


def test_files_are_in_hugging_face_format(tmp_path):
    folder = clip_tokenizer_files(tmp_path)
    assert folder == tmp_path / "clip-tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert len(merges) == 1 + 48894
    assert merges[1] == "i n"


def test_files_are_reused_and_leave_no_temp_dirs(tmp_path):
    folder = clip_tokenizer_files(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert clip_tokenizer_files(tmp_path) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert [p.name for p in tmp_path.iterdir()] == ["clip-tokenizer"]


def test_incomplete_folder_is_rebuilt(tmp_path):
    broken = tmp_path / "clip-tokenizer"
    broken.mkdir()
    (broken / "vocab.json").write_text("{}")
    load_clip_tokenizer(tmp_path)
    assert len(json.loads((broken / "vocab.json").read_text(encoding="utf-8"))) == 49408


def test_default_cache_is_diffmem_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFMEM_CACHE", str(tmp_path))
    assert clip_tokenizer_files() == tmp_path / "clip-tokenizer"


def test_missing_open_clip_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(clip_tokenizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DiffmemError, match="pip install --no-deps open-clip-torch"):
        clip_tokenizer_files(tmp_path)
    assert not (tmp_path / "clip-tokenizer").exists()


def test_open_clip_is_not_imported(tmp_path):
    clip_tokenizer_files(tmp_path)
    assert "open_clip" not in sys.modules
