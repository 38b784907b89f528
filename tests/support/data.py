"""Small corpora on disk, from the bundled bilingual TinyStories:

* :func:`small_bilingual`: a slice, tokenized and sharded in a few seconds, for tests that need
  real shards but not the whole corpus (prepare_bilingual takes ~10-40 s);
* :func:`bilingual_demo`: the whole demo data with a 1024-token BPE (what
  :func:`tests.support.configs.tiny_overrides` runs on);
* :func:`resume_corpus` and :func:`data_cfg`: 120 stories per language in ~25 small shards per
  source, and the ``data`` section that reads them (the resume and pipeline tests).
"""

from __future__ import annotations

import itertools
import json
import lzma
from pathlib import Path

from tests.support import ROOT

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


def bilingual_demo(out: Path) -> Path:
    """The bilingual demo data (``prepare_bilingual``) with a 1024-token BPE, in ``out``."""
    from pipeline.data.prepare import prepare_bilingual

    prepare_bilingual(out, vocab_size=1024)
    return out


TINYSTORIES = ROOT / "data" / "tinystories"
RESUME_SEQ = 32
HELDOUT = 0.05


def _subset(src: Path, dst: Path, n: int) -> Path:
    with lzma.open(src, "rt", encoding="utf-8") as handle:
        dst.write_text("".join(next(handle) for _ in range(n)), encoding="utf-8")
    return dst


def resume_corpus(root: Path) -> Path:
    """120 English + 120 Spanish stories, a 512-id BPE trained on them, ~25 shards per source
    (enough for 4 ranks x 2 workers), in ``root``."""
    from pipeline.data.shards import write_shards
    from pipeline.data.tokenizer import train_bpe

    texts = []
    for name, lang in (("en", "stories_en"), ("es", "stories_es")):
        path = _subset(TINYSTORIES / f"{lang}.jsonl.xz", root / f"{name}.jsonl", 120)
        texts += [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    tokenizer = train_bpe(texts, 512, root / "bpe512.json")
    for name in ("en", "es"):
        manifest = write_shards([str(root / f"{name}.jsonl")], tokenizer, RESUME_SEQ, root / name, source=name,
                                shard_size_mb=0.012, progress=False)
        assert len(manifest["shards"]) >= 8
    return root


def data_cfg(root: Path, **overrides) -> dict:
    """The ``data`` section reading :func:`resume_corpus`'s shards (``overrides`` on top)."""
    cfg = {
        "sources": [{"path": str(root / "en"), "true_label": "retain"},
                    {"path": str(root / "es"), "true_label": "forget:spanish"}],
        "domains": ["spanish"],
        "tokenizer": str(root / "bpe512.json"),
        "shuffle_buffer": 16,
        "heldout_fraction": HELDOUT,
        "tagging": {"undiscovered_rate": 0.2, "retain_fraction": 0.25},
        "num_workers": 0,
    }
    cfg.update(overrides)
    return cfg
