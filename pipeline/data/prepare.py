"""One-call preparation of the bundled data sets (what the demo and benchmarks use).

Each function is idempotent: sharding and tagging resume/skip finished work, so calling it again
with the same arguments is cheap.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.io import BUNDLED_DATA
from pipeline.data.tokenizer import TextTokenizer, load_tokenizer, train_bpe

TINYSTORIES = {
    "en": BUNDLED_DATA / "tinystories/stories_en.jsonl.xz",
    "es": BUNDLED_DATA / "tinystories/stories_es.jsonl.xz",
}
WIKI = BUNDLED_DATA / "wiki_vital/articles_en.jsonl.xz"
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


def bilingual_tokenizer(out_dir: str | Path, vocab_size: int = 4096) -> TextTokenizer:
    """A byte-level BPE trained on both languages (about a second on 2 cores), cached as tokenizer.json."""
    from pipeline.data.readers import iter_documents

    path = Path(out_dir) / f"bpe{vocab_size}.json"
    if path.exists():
        return load_tokenizer(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = (d.text for d in iter_documents([str(p) for p in TINYSTORIES.values()]))
    return train_bpe(texts, vocab_size, path)


def prepare_bilingual(
    out_dir: str | Path,
    *,
    vocab_size: int = 4096,
    seq_len: int = 256,
    shard_size_mb: float = 0.25,
    undiscovered_rate: float = 0.2,
    retain_fraction: float = 0.25,
    progress: bool = False,
) -> dict:
    """Shard English and Spanish stories as two sources and return the `data:` config section for the
    paper's TinyStories setting (Spanish = forget domain 'spanish', 20% undiscovered, 25% English retain)."""
    from pipeline.data.shards import write_shards

    out_dir = Path(out_dir)
    tokenizer = bilingual_tokenizer(out_dir, vocab_size)
    for name, path in TINYSTORIES.items():
        write_shards(
            [str(path)],
            tokenizer,
            seq_len,
            out_dir / name,
            source=name,
            shard_size_mb=shard_size_mb,
            progress=progress,
        )
    return {
        "sources": [
            {"path": str(out_dir / "en"), "weight": 1.0, "true_label": "retain"},
            {"path": str(out_dir / "es"), "weight": 1.0, "true_label": "forget:spanish"},
        ],
        "domains": ["spanish"],
        "tokenizer": tokenizer.spec,
        "filter": "none",
        "tagging": {
            "source": "simulated",
            "undiscovered_rate": undiscovered_rate,
            "retain_fraction": retain_fraction,
        },
        "heldout_fraction": 0.05,
    }


def prepare_wiki(
    out_dir: str | Path,
    *,
    tokenizer: str = "gpt2",
    seq_len: int = 512,
    retain_fraction: float = 0.1,
    progress: bool = False,
) -> dict:
    """Shard the Wikipedia leads, train the biology classifier, tag the shards; return a `data:` section
    with classifier tagging (forget = biology, adjacent dropped by the strict filter)."""
    from pipeline.data.classifier import train_classifier
    from pipeline.data.labels import LabelRules
    from pipeline.data.readers import iter_documents
    from pipeline.data.shards import write_shards
    from pipeline.data.tagging import tag_shards

    out_dir = Path(out_dir)
    tok = load_tokenizer(tokenizer)
    write_shards(
        [str(WIKI)], tok, seq_len, out_dir / "wiki", source="wiki", shard_size_mb=0.5, progress=progress
    )
    classifier = out_dir / "wiki_classifier.npz"
    if not classifier.exists():
        rules = LabelRules.load(str(CONFIGS / "wiki_labels.yaml"))
        model, _ = train_classifier(list(iter_documents([str(WIKI)])), rules, "words")
        model.save(classifier)
    tag_shards(str(out_dir / "wiki"), str(classifier), str(out_dir / "wiki_tags"), tok, progress=progress)
    return {
        "sources": [{"path": str(out_dir / "wiki"), "tags": str(out_dir / "wiki_tags")}],
        "domains": ["biology"],
        "tokenizer": tokenizer,
        "filter": "none",
        "tagging": {"source": "classifier", "retain_fraction": retain_fraction},
        "heldout_fraction": 0.05,
    }
