"""A small slice of the bundled bilingual TinyStories, tokenized and sharded in a few seconds, for
tests that need real shards but not the whole corpus (prepare_bilingual takes ~10-40 s)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

DOCS = 300  # per language
VOCAB = 512
SEQ = 64


def small_bilingual(out: Path, docs: int = DOCS, vocab_size: int = VOCAB) -> dict[str, str]:
    """Shards ``out/en`` and ``out/es`` of the first ``docs`` stories of each language and a BPE
    ``out/bpe<vocab_size>.json`` trained on them; returns config overrides for them."""
    from pipeline.data.prepare import TINYSTORIES
    from pipeline.data.readers import iter_documents
    from pipeline.data.shards import write_shards
    from pipeline.data.tokenizer import train_bpe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    for lang, path in TINYSTORIES.items():
        subset = out / f"{lang}.jsonl"
        rows = [{"id": d.key, "text": d.text} for d in itertools.islice(iter_documents([str(path)]), docs)]
        subset.write_text("".join(json.dumps(r) + "\n" for r in rows))
        texts[lang] = [r["text"] for r in rows]
    tokenizer = train_bpe(itertools.chain(*texts.values()), vocab_size, out / f"bpe{vocab_size}.json")
    for lang in TINYSTORIES:
        write_shards([str(out / f"{lang}.jsonl")], tokenizer, SEQ, out / lang, source=lang, progress=False)
    return {
        "model.vocab_size": str(vocab_size), "model.max_seq_len": str(SEQ), "data.num_workers": "0",
        "data.tokenizer": str(out / f"bpe{vocab_size}.json"),
        "data.sources": f"[{{path: {out}/en, true_label: retain}}, {{path: {out}/es, true_label: 'forget:spanish'}}]",
    }
