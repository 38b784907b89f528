"""Tokenizers: GPT-2 byte-level BPE from the bundled files, and small BPEs trained on the corpus.

Both are HF `tokenizers` objects wrapped in `TextTokenizer`, which adds what the shards need: the
end-of-text id that terminates every document and a content hash that the shard manifest records,
so shards tokenized with one vocabulary are never read with another.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.data.errors import DataError
from pipeline.data.io import BUNDLED_DATA, read_bytes

EOT = "<|endoftext|>"
GPT2_DIR = BUNDLED_DATA / "tokenizers" / "gpt2"


class TextTokenizer:
    """A tokenizer plus the identity facts the data layer checks (eot id, vocab size, hash)."""

    def __init__(self, tokenizer: Tokenizer, spec: str) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        eot_id = tokenizer.token_to_id(EOT)
        if eot_id is None:
            raise DataError(f"{spec}: tokenizer has no {EOT} token")
        self.eot_id: int = eot_id
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.hash: str = tokenizer_hash(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_strings(self) -> list[str]:
        """Decoded text of every id (used to find paragraph breaks in token space)."""
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """Hash of what determines the ids (vocab, merges, added tokens, pre-tokenizer), not of file bytes."""
    state = json.loads(tokenizer.to_str())
    model = state.get("model", {})
    canonical = {
        "vocab": sorted(model.get("vocab", {}).items()),
        "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        "added": sorted((t["id"], t["content"]) for t in state.get("added_tokens", [])),
        "pre_tokenizer": state.get("pre_tokenizer"),
        "normalizer": state.get("normalizer"),
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # GPT-2: no prefix space, GPT-2's regex split, bytes mapped to printable unicode.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOT])
    return tokenizer


def load_gpt2(directory: str | os.PathLike = GPT2_DIR) -> TextTokenizer:
    """GPT-2 from encoder.json + vocab.bpe (optionally .xz), ids identical to the original encoder."""
    directory = Path(directory)

    def find(name: str) -> Path:
        for candidate in (directory / name, directory / f"{name}.xz"):
            if candidate.exists():
                return candidate
        raise DataError(f"{directory}: missing {name}")

    vocab = json.loads(read_bytes(find("encoder.json")))
    lines = read_bytes(find("vocab.bpe")).decode("utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line and not line.startswith("#version")]
    return TextTokenizer(_byte_level_bpe(vocab, merges), "gpt2")  # type: ignore[arg-type]


def load_tokenizer(spec: str) -> TextTokenizer:
    """'gpt2' (bundled), a tokenizer.json written by `train_bpe`, or a dir with encoder.json/vocab.bpe.

    Cached per (spec, file modification time): every loader build checks the hash, and parsing GPT-2's
    50k merges takes half a second.
    """
    path = Path(spec)
    stamp = path.stat().st_mtime_ns if spec != "gpt2" and path.exists() else 0
    return _load_tokenizer_cached(spec, stamp)


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(spec: str, stamp: int) -> TextTokenizer:
    if spec == "gpt2":
        return load_gpt2()
    path = Path(spec)
    if path.is_dir():
        return load_gpt2(path)
    if not path.is_file():
        raise DataError(f"{spec}: no such tokenizer (expected 'gpt2', a tokenizer .json, or a GPT-2 dir)")
    try:
        tokenizer = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise DataError(f"{spec}: not a tokenizers JSON file ({str(exc).splitlines()[0]})") from None
    return TextTokenizer(tokenizer, str(path))


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | os.PathLike | None = None) -> TextTokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenization) with <|endoftext|> as a special token.

    CPU-sized models can't afford GPT-2's 50k-row embedding; 4-8k ids trained on the corpus compress
    it almost as well.
    """
    if vocab_size < 256 + 1:
        raise DataError(f"--vocab-size: expected at least 257 (256 bytes + {EOT}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if out is not None:
        from pipeline.data.io import atomic_write_bytes

        atomic_write_bytes(out, tokenizer.to_str().encode())
    return TextTokenizer(tokenizer, str(out) if out is not None else "<trained>")
