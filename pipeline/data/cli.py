"""`sgtm data ...` subcommands: train-tokenizer, shard, train-classifier, tag."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.data.errors import DataError


def _user_error(exc: DataError) -> Exception:
    try:
        from pipeline.cli import UserError
    except ImportError:  # pipeline.cli unavailable: keep the one-line message anyway
        return exc
    return UserError(str(exc))


def _run(handler):  # noqa: ANN001, ANN202 - small adapter: DataError -> the CLI's one-line UserError
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except DataError as exc:
            raise _user_error(exc) from None

    return wrapped


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from pipeline.data.readers import iter_documents
    from pipeline.data.tokenizer import train_bpe

    tokenizer = train_bpe((d.text for d in iter_documents(args.input)), args.vocab_size, args.out)
    print(
        f"wrote {args.out}: vocab {tokenizer.vocab_size}, eot id {tokenizer.eot_id}, "
        f"hash {tokenizer.hash[:12]}"
    )
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from pipeline.data.shards import write_shards
    from pipeline.data.tokenizer import load_tokenizer

    manifest = write_shards(
        args.input,
        load_tokenizer(args.tokenizer),
        args.seq_len,
        args.out,
        source=args.source,
        shard_size_mb=args.shard_size_mb,
        progress=not args.quiet,
    )
    totals = manifest["totals"]
    print(
        f"{args.out}: {len(manifest['shards'])} shards, {totals['docs']} documents, "
        f"{totals['tokens']} tokens, "
        f"{totals['samples']} samples of {manifest['seq_len'] + 1} tokens (source {manifest['source']})"
    )
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from pipeline.data.classifier import train_classifier
    from pipeline.data.labels import LabelRules
    from pipeline.data.readers import iter_documents

    rules = LabelRules.load(args.labels)
    classifier, report = train_classifier(
        list(iter_documents(args.input)),
        rules,
        args.kind,
        train_fraction=args.train_fraction,
        heldout_fraction=args.heldout_fraction,
        seed=args.seed,
    )
    classifier.save(args.out)
    report_path = args.report or str(Path(args.out).with_suffix(".report.json"))
    Path(report_path).write_text(json.dumps(report, indent=1) + "\n")
    print(f"trained on {report['train_docs']} labelled documents; held-out {report['heldout_docs']}:")
    print(f"{'class':<20} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}")
    for name, row in report["classes"].items():
        print(
            f"{name:<20} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>6.3f} {row['support']:>8}"
        )
    print(f"accuracy {report['accuracy']:.3f}; wrote {args.out} and {report_path}")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from pipeline.data.config import TaggingConfig
    from pipeline.data.labels import LabelRules
    from pipeline.data.shards import check_tokenizer, load_manifest
    from pipeline.data.tagging import ModeAssigner, tag_shards
    from pipeline.data.tokenizer import load_tokenizer

    manifest = load_manifest(args.shards)
    tokenizer = load_tokenizer(args.tokenizer or manifest["tokenizer"]["spec"])
    check_tokenizer(manifest, args.shards, tokenizer)
    rules = LabelRules.load(args.labels) if args.labels else None
    tagging = TaggingConfig(
        source="classifier",
        forget_threshold=args.forget_threshold,
        retain_threshold=args.retain_threshold,
        retain_fraction=args.retain_fraction,
    )
    domains = rules.domains if rules else None
    if domains is None and args.classifier != "truth":
        from pipeline.data.classifier import HashedTextClassifier

        clf = HashedTextClassifier.load(args.classifier)
        domains = (clf.rules or {}).get("domains") or sorted(
            c[7:] for c in clf.classes if c.startswith("forget:")
        )
    summary = tag_shards(
        args.shards,
        args.classifier,
        args.out,
        tokenizer,
        rules=rules,
        assigner=ModeAssigner(tagging, domains or []),
        progress=not args.quiet,
    )
    print(
        f"tagged {len(summary['shards'])} shards of {summary['source']} into {args.out} "
        f"(thresholds forget>={args.forget_threshold}, retain>={args.retain_threshold}, "
        f"retain fraction {args.retain_fraction})"
    )
    print(summary["confusion_text"])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="tokenizers, shards, tagging")
    p.set_defaults(func=lambda args: p.print_help() or 0)
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE on a corpus (HF tokenizers)")
    t.add_argument("--input", nargs="+", required=True, help="jsonl / txt / parquet / datasets dir (.xz ok)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="tokenizer .json to write")
    t.set_defaults(func=_run(cmd_train_tokenizer))

    s = sub.add_parser("shard", help="tokenize documents into webdataset shards of packed sequences")
    s.add_argument("--input", nargs="+", required=True, help="jsonl / txt / parquet / datasets dir (.xz ok)")
    s.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer .json")
    s.add_argument("--seq-len", type=int, required=True, help="samples hold seq-len + 1 tokens")
    s.add_argument("--out", required=True, help="shard directory (re-running resumes)")
    s.add_argument("--source", help="source name (default: the first input's file name stem)")
    s.add_argument("--shard-size-mb", type=float, default=16.0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_run(cmd_shard))

    c = sub.add_parser("train-classifier", help="train a hashed n-gram logistic-regression domain classifier")
    c.add_argument(
        "--input", nargs="+", required=True, help="labelled documents (metadata fields for --labels)"
    )
    c.add_argument("--labels", required=True, help="YAML label rules (configs/data/*_labels.yaml)")
    c.add_argument(
        "--kind",
        choices=["words", "chars"],
        default="words",
        help="words: topic classifier; chars: language id",
    )
    c.add_argument("--out", required=True, help="classifier .npz to write")
    c.add_argument("--train-fraction", type=float, default=0.3, help="share of training docs in the seed set")
    c.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.05,
        help="held-out split for the report (same key hash as data.heldout_fraction)",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--report", help="report JSON (default: OUT with .report.json)")
    c.set_defaults(func=_run(cmd_train_classifier))

    g = sub.add_parser("tag", help="attach domain labels + confidences to every document of a shard dir")
    g.add_argument("--shards", required=True, help="shard directory")
    g.add_argument(
        "--classifier", required=True, help="classifier .npz, or 'truth' (label rules, confidence 1)"
    )
    g.add_argument("--out", required=True, help="tag sidecar directory")
    g.add_argument("--labels", help="YAML label rules for true labels (default: the classifier's own)")
    g.add_argument("--tokenizer", help="default: the manifest's tokenizer")
    g.add_argument("--forget-threshold", type=float, default=0.5)
    g.add_argument("--retain-threshold", type=float, default=0.5)
    g.add_argument("--retain-fraction", type=float, default=0.25)
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=_run(cmd_tag))


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.data.cli ...` (same as `sgtm data ...`)."""
    parser = argparse.ArgumentParser(prog="sgtm")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if type(exc).__name__ in ("UserError", "DataError"):
            print(f"sgtm: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
