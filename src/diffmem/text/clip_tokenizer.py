"""The OpenAI CLIP BPE tokenizer, built offline from the vocabulary shipped with open-clip-torch."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import CLIPTextConfig, CLIPTokenizer

from diffmem.errors import DiffmemError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters OpenAI CLIP uses for the bytes 0..255, in vocabulary order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + n for n in range(len(extra))]
    return [chr(c) for c in codes]


def _bpe_source() -> Path:
    """Path of the BPE merges file inside the installed open_clip package (which is never imported)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / BPE_FILE
        if candidate.is_file():
            return candidate
    raise DiffmemError(
        f"The CLIP tokenizer vocabulary ({BPE_FILE}) was not found. "
        "Install it with: pip install --no-deps open-clip-torch"
    )


def _default_cache_dir() -> Path:
    """The diffmem cache folder: $DIFFMEM_CACHE, else ~/.cache/diffmem."""
    return Path(os.environ.get("DIFFMEM_CACHE") or Path.home() / ".cache" / "diffmem")


def _write_files(source: Path, directory: Path) -> None:
    """Write the Hugging Face tokenizer files converted from the OpenAI BPE file into `directory`."""
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : 1 + _NUM_MERGES]
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise DiffmemError(f"{source} is not the OpenAI CLIP vocabulary; reinstall open-clip-torch.")
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def clip_tokenizer_files(cache_dir: Path | None = None) -> Path:
    """Folder holding the CLIP tokenizer in Hugging Face format, created in the cache on first use."""
    target = Path(cache_dir or _default_cache_dir()) / "clip-tokenizer"
    if all((target / name).is_file() for name in _FILES):
        return target
    source = _bpe_source()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".clip-tokenizer-", dir=target.parent))
    try:
        _write_files(source, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except OSError:
        if not all((target / name).is_file() for name in _FILES):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_clip_tokenizer(cache_dir: Path | None = None, pad_token: str = EOS) -> CLIPTokenizer:
    """The OpenAI CLIP tokenizer (49408 tokens, 77-token context), loaded without network access."""
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_files(cache_dir), pad_token=pad_token)
    if len(tokenizer) != VOCAB_SIZE:
        raise DiffmemError(
            f"The CLIP tokenizer loaded with {len(tokenizer)} tokens instead of {VOCAB_SIZE}; "
            "delete the clip-tokenizer folder in the diffmem cache and try again."
        )
    return tokenizer


def clip_text_config(
    hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int, **overrides: object
) -> CLIPTextConfig:
    """A CLIP text-encoder config over the full OpenAI CLIP vocabulary and 77-token context."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=VOCAB_SIZE - 1,
        **overrides,
    )
