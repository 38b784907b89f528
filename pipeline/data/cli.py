"""`sgtm data ...` subcommands: train-tokenizer, shard, train-classifier, tag."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.data.errors import DataError
from pipeline.errors import UserError


def _user_error(exc: DataError) -> Exception:
    return UserError(str(exc))


def _run(handler):  # noqa: ANN001, ANN202 - small adapter: DataError -> the CLI's one-line UserError
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except DataError as exc:
            raise _user_error(exc) from None

    return wrapped


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from pipeline.data.readers import ReadReport, iter_documents
    from pipeline.data.tokenizer import train_bpe

    report = ReadReport(skip_bad=args.skip_bad_records)
    tokenizer = train_bpe((d.text for d in iter_documents(args.input, report)), args.vocab_size, args.out)
    print(
        f"wrote {args.out}: vocab {tokenizer.vocab_size}, eot id {tokenizer.eot_id}, "
        f"hash {tokenizer.hash[:12]}"
    )
    if args.skip_bad_records:
        print(f"--skip-bad-records: {report.summary()}")
    return 0


def _split(args: argparse.Namespace):  # noqa: ANN202 - Split | None
    from pipeline.data.distributed_prep import resolve_split

    split = resolve_split(args.rank, args.world_size, args.rank_from_env)
    if split is not None and args.merge:
        raise DataError("--merge: the merge is one process; drop --rank/--world-size/--rank-from-env")
    return split


def _bad_records_line(manifest: dict) -> str | None:
    bad = manifest.get("bad_records")
    if bad is None:
        return None
    n = sum(bad["total"].values())
    if n == 0:
        return "--skip-bad-records: no bad records"
    first = f"; first: {bad['first'][0]}" if bad["first"] else ""
    return f"--skip-bad-records: skipped {n} ({', '.join(f'{k} {v}' for k, v in bad['total'].items())}){first}"


def cmd_shard(args: argparse.Namespace) -> int:
    import time

    from pipeline.data.distributed_prep import merge_shard_parts, write_shard_part
    from pipeline.data.shards import write_shards
    from pipeline.data.tokenizer import load_tokenizer

    split = _split(args)
    tokenizer = load_tokenizer(args.tokenizer)
    common = {"source": args.source, "shard_size_mb": args.shard_size_mb, "skip_bad_records": args.skip_bad_records,
              "progress": not args.quiet}
    started = time.time()
    if split is not None:
        record = write_shard_part(args.input, tokenizer, args.seq_len, args.out, split,
                                  block_records=args.block_records, **common)
        if record.get("already_merged"):
            print(f"{args.out}: already complete (merged); nothing to do for rank {split.rank} of {split.world}")
            return 0
        bad = sum(sum(c.values()) for c in record["report"]["bad"].values())
        print(
            f"{args.out}: rank {split.rank} of {split.world} tokenized {record['docs']} documents, "
            f"{record['tokens']} tokens" + (f", skipped {bad} bad records" if args.skip_bad_records else "")
            + f" ({time.time() - started:.1f} s); merge with the same command plus --merge"
        )
        return 0
    if args.merge:
        manifest = merge_shard_parts(args.input, tokenizer, args.seq_len, args.out, keep_parts=args.keep_parts,
                                     **common)
    else:
        manifest = write_shards(args.input, tokenizer, args.seq_len, args.out, **common)
    totals = manifest["totals"]
    print(
        f"{args.out}: {len(manifest['shards'])} shards, {totals['docs']} documents, "
        f"{totals['tokens']} tokens, "
        f"{totals['samples']} samples of {manifest['seq_len'] + 1} tokens (source {manifest['source']})"
        f"{' merged' if args.merge else ''} in {time.time() - started:.1f} s"
    )
    line = _bad_records_line(manifest)
    if line:
        print(line)
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from pipeline.data.classifier import train_classifier
    from pipeline.data.labels import LabelRules
    from pipeline.data.readers import ReadReport, iter_documents

    rules = LabelRules.load(args.labels)
    read = ReadReport(skip_bad=args.skip_bad_records)
    documents = list(iter_documents(args.input, read))
    if args.skip_bad_records:
        print(f"--skip-bad-records: {read.summary()}")
    classifier, report = train_classifier(
        documents,
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
    from pipeline.data.classifier import load_classifier, parse_label_map
    from pipeline.data.config import TaggingConfig
    from pipeline.data.labels import LabelRules
    from pipeline.data.shards import check_tokenizer, load_manifest
    from pipeline.data.tagging import ModeAssigner, merge_tags, tag_shards
    from pipeline.data.tokenizer import load_tokenizer

    split = _split(args)
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
    label_map = parse_label_map(args.label_map)
    classifier = None
    if args.classifier != "truth":
        classifier = load_classifier(args.classifier, label_map, args.batch_size, args.device)
    elif label_map:
        raise DataError("--label-map: --classifier truth predicts roles already")
    domains = rules.domains if rules else None
    if domains is None and classifier is not None:
        domains = (classifier.rules or {}).get("domains") or sorted(
            c[7:] for c in classifier.classes if c.startswith("forget:")
        )
    kwargs = {"rules": rules, "assigner": ModeAssigner(tagging, domains or []), "classifier": classifier}
    if args.merge:
        summary = merge_tags(args.shards, args.classifier, args.out, tokenizer, **kwargs)
    else:
        summary = tag_shards(args.shards, args.classifier, args.out, tokenizer, progress=not args.quiet,
                             split=split, **kwargs)
    if split is not None:
        print(f"rank {split.rank} of {split.world}: tagged {len(summary['shards'])} shards into {args.out}; "
              "merge with the same command plus --merge")
        return 0
    print(
        f"tagged {len(summary['shards'])} shards of {summary['source']} into {args.out} "
        f"(thresholds forget>={args.forget_threshold}, retain>={args.retain_threshold}, "
        f"retain fraction {args.retain_fraction}){' merged' if args.merge else ''}"
    )
    print(summary["confusion_text"])
    return 0


def _add_split_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--rank", type=int, help=f"this process's rank: {what} (with --world-size)")
    p.add_argument("--world-size", type=int, help="number of ranks of a split run")
    p.add_argument(
        "--rank-from-env", action="store_true",
        help="rank/world from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else torchrun's RANK/WORLD_SIZE, "
        "else srun's SLURM_PROCID/SLURM_NTASKS",
    )
    p.add_argument("--merge", action="store_true", help="after all ranks finished: write the result (one process)")


SKIP_HELP = ("count and report records with null/missing text, bad JSON or invalid UTF-8 and go on "
             "(default: stop with one line naming the file and line)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="tokenizers, shards, tagging")
    p.set_defaults(func=lambda args: p.print_help() or 0)
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    t = sub.add_parser("train-tokenizer", help="train a byte-level BPE on a corpus (HF tokenizers)")
    t.add_argument("--input", nargs="+", required=True, help="jsonl / txt / parquet / datasets dir (.xz ok)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="tokenizer .json to write")
    t.add_argument("--skip-bad-records", action="store_true", help=SKIP_HELP)
    t.set_defaults(func=_run(cmd_train_tokenizer))

    s = sub.add_parser("shard", help="tokenize documents into webdataset shards of packed sequences")
    s.add_argument("--input", nargs="+", required=True, help="jsonl / txt / parquet / datasets dir (.xz ok)")
    s.add_argument("--tokenizer", default="gpt2", help="'gpt2' or a tokenizer .json")
    s.add_argument("--seq-len", type=int, required=True, help="samples hold seq-len + 1 tokens")
    s.add_argument("--out", required=True, help="shard directory (re-running resumes)")
    s.add_argument("--source", help="source name (default: the first input's file name stem)")
    s.add_argument("--shard-size-mb", type=float, default=16.0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--skip-bad-records", action="store_true", help=SKIP_HELP)
    _add_split_flags(s, "tokenizes record blocks (f + i // B) mod W")
    s.add_argument("--block-records", type=int, default=4096,
                   help="B: records per block dealt to the ranks (split runs only; any B gives the same shards)")
    s.add_argument("--keep-parts", action="store_true", help="--merge: keep <out>/_parts (deleted by default)")
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
    c.add_argument("--skip-bad-records", action="store_true", help=SKIP_HELP)
    c.set_defaults(func=_run(cmd_train_classifier))

    g = sub.add_parser("tag", help="attach domain labels + confidences to every document of a shard dir")
    g.add_argument("--shards", required=True, help="shard directory")
    g.add_argument(
        "--classifier", required=True,
        help="classifier .npz from train-classifier, fastText .bin/.ftz, local Hugging Face "
        "AutoModelForSequenceClassification directory, or 'truth' (label rules, confidence 1)",
    )
    g.add_argument("--out", required=True, help="tag sidecar directory")
    g.add_argument("--labels", help="YAML label rules for true labels (default: the classifier's own)")
    g.add_argument("--tokenizer", help="default: the manifest's tokenizer")
    g.add_argument("--forget-threshold", type=float, default=0.5)
    g.add_argument("--retain-threshold", type=float, default=0.5)
    g.add_argument("--retain-fraction", type=float, default=0.25)
    g.add_argument("--label-map", help="model label -> role: 'LABEL_0=retain,LABEL_1=forget:bio' or a YAML/JSON file")
    g.add_argument("--batch-size", type=int, default=32, help="Hugging Face classifiers: texts per forward pass")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="Hugging Face classifiers: auto = GPU when present")
    g.add_argument("--quiet", action="store_true")
    _add_split_flags(g, "tags shard range [r*n/W, (r+1)*n/W)")
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
