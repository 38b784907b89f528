"""`sgtm sweep | analyze | attack | rmu | report`."""

from __future__ import annotations

import argparse

from pipeline.experiments.analyses import registry


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run a grid of experiments (locally, one cell after another) or emit "
                                            "a SLURM array job; finished cells are skipped")
    p.add_argument("--config", required=True, help="sweep YAML or the name of one in configs/sweeps/")
    p.add_argument("--out", default="runs/sweeps", help="cells go to OUT/cells/<key>, results to OUT/<name>/")
    p.add_argument("--slurm", action="store_true", help="write OUT/<name>/cells.txt + sweep.sbatch instead of running")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the pending cells")
    p.add_argument("--only", nargs="*", help="run only cells whose labels match, e.g. method=sgtm,size=d64")
    p.add_argument("--cell", metavar="LABELS", help="print the run directory of the one cell matching LABELS "
                                                    "(e.g. method=sgtm,data.tagging.undiscovered_rate=0.2) and exit")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="cell store root: every finished cell's summary goes to DIR/<name>/<cell>.json and a cell "
                        "whose stored summary is current is skipped (default: docs/results/cells, committed)")
    p.add_argument("--no-store", action="store_true", help="neither read nor write the cell store")
    p.add_argument("--store-only", action="store_true",
                   help="train nothing: (re)write the summaries of cells whose run dirs finished under today's "
                        "NUMERICS_VERSION (after a SLURM array, or for runs from before the store)")
    p.add_argument("--pending", action="store_true",
                   help="print the label selector of every cell that still needs training, one a line, and exit")
    p.set_defaults(func=cmd_sweep)

    a = subparsers.add_parser("analyze", help="an analysis of sweep results or a run: JSON + PNG")
    asub = a.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    for analysis in registry.commands():  # one module each under pipeline/experiments/analyses/
        q = asub.add_parser(analysis.name, help=analysis.help)
        analysis.arguments(q)
        q.set_defaults(func=cmd_analyze)

    for name, hlp in (("attack", "adversarial fine-tuning of the deployed model on 50/50 forget/retain data"),
                      ("rmu", "RMU unlearning of a (no-filter) model, then the fine-tuning attack")):
        q = subparsers.add_parser(name, help=hlp)
        q.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or model dir")
        q.add_argument("--out", required=True)
        q.add_argument("--reference", help="run dir (final.json) of the no-filter model: its forget loss is the target")
        q.add_argument("--target-loss", type=float, help="forget loss counted as recovered (instead of --reference)")
        q.add_argument("--steps", type=int, default=200, help="attack steps")
        q.add_argument("--eval-every", type=int, default=10)
        q.add_argument("--lr", type=float, default=1e-3, help="attack learning rate")
        q.add_argument("--batch-size", type=int, default=8, help="sequences per attack step (half forget)")
        q.add_argument("--eval-batches", type=int, default=None,
                       help="held-out batches to evaluate on (default: the whole held-out split)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--stop-at-target", action="store_true", help="stop once the target is reached")
        if name == "attack":
            q.add_argument("--ablate", choices=["auto", "yes", "no"], default="auto",
                           help="auto: zero the forget parameters of SGTM/GR/AM models, not of filters")
            q.add_argument("--name", default="attack", help="analysis name (file stem)")
            q.set_defaults(func=cmd_attack)
        else:
            q.add_argument("--layer", type=int,
                           help="steered block (default n_layers/2-1); MLPs of blocks layer-2..layer learn")
            q.add_argument("--coeff", type=float, default=20.0, help="steering coefficient")
            q.add_argument("--alpha", type=float, default=100.0, help="retain-preservation weight")
            q.add_argument("--rmu-steps", type=int, default=80)
            q.add_argument("--rmu-lr", type=float, default=5e-4)
            q.add_argument("--no-attack", action="store_true", help="only unlearn")
            q.set_defaults(func=cmd_rmu)

    p = subparsers.add_parser("eval-harness", help="lm-evaluation-harness accuracies of the deployed model on "
                                                   "multiple-choice tasks made from the held-out split (offline)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run dir, checkpoint dir or model dir: its deployed model is exported "
                                          "(ablated for SGTM / Gradient Routing / activation masking, else full)")
    src.add_argument("--hf", help="an existing HF export (sgtm export-hf), scored as it is")
    p.add_argument("--config", help="experiment YAML whose data section makes the tasks (default: the checkpoint's)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="KIND",
                   help="task kinds: cloze, continuation (default: both), one task per kind and domain")
    p.add_argument("--seed", type=int, default=0, help="item sampling seed")
    p.add_argument("--max-items", type=int, default=500, help="items per task at most")
    p.add_argument("--task-dir", help="write (or reuse, when generated from the same data and settings) the "
                                      "task files here (default: a temporary directory)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", required=True, help="result JSON: accuracy and the harness's stderr per task")
    p.set_defaults(func=cmd_eval_harness)

    p = subparsers.add_parser("report", help="gather analyses (*.analysis.json + PNG) into one Markdown report")
    p.add_argument("--runs", nargs="+", required=True, help="directories searched for *.analysis.json")
    p.add_argument("--out", required=True, help="report directory (results.md + figures/)")
    p.add_argument("--name", default="results.md")
    p.add_argument("--title", default="SGTM results")
    p.add_argument("--intro", help="Markdown template placed under the title ({{tag/name:path|fmt}} fields are "
                                   "filled from the summaries)")
    p.add_argument("--readme", help="also fill the results block of this README from the same summaries")
    p.set_defaults(func=cmd_report)


def _cmd() -> str:
    from pipeline.experiments.common import command_line

    return command_line()


def cmd_sweep(args) -> int:
    from pipeline.experiments.cells import STORE_ROOT
    from pipeline.experiments.sweep import find_cell, pending_selectors, run_sweep

    if args.cell:
        print(find_cell(args.config, args.cell, args.out))
        return 0
    store = None if args.no_store else (args.store or STORE_ROOT)
    if args.store_only and store is None:
        raise ValueError("--store-only needs the store (drop --no-store)")
    if args.pending:
        print("\n".join(pending_selectors(args.config, args.out, only=args.only, store=store)))
        return 0
    res = run_sweep(args.config, args.out, slurm=args.slurm, dry_run=args.dry_run, only=args.only, store=store,
                    store_only=args.store_only)
    done = sum(c["done"] for c in res["cells"])
    print(f"[sweep] {res['sweep']}: {done}/{len(res['cells'])} run dirs finished here; results in "
          f"{args.out}/{res['sweep']}/results.json" + (f"; summaries in {res['store']}" if res.get("store") else ""))
    if res.get("failed"):
        print(f"[sweep] failed cells (see <cell>/train.log): {', '.join(res['failed'])}")
    return 1 if res.get("failed") else 0


def cmd_analyze(args) -> int:
    analysis = registry.load()[args.analysis]
    res = analysis.run(args, _cmd())
    for c in res.get("claims", []):
        print(analysis.claim_line(c))
    print(f"[analyze] wrote {args.out}")
    return 0


def cmd_eval_harness(args) -> int:
    from pipeline.experiments.eval_harness import evaluate

    r = evaluate(checkpoint=args.checkpoint, hf=args.hf, config=args.config, kinds=args.tasks, seed=args.seed,
                 max_items=args.max_items, task_dir=args.task_dir, batch_size=args.batch_size, out=args.out,
                 command=_cmd())
    for name, t in r["tasks"].items():
        se = "-" if t["acc_stderr"] is None else f"{t['acc_stderr']:.3f}"
        print(f"  {name}: acc {t['acc']:.3f} +- {se} ({t['items']} items, chance {t['chance']:.2f})")
    print(f"[eval-harness] wrote {args.out}")
    return 0


def _attack_kwargs(args) -> dict:
    return dict(steps=args.steps, eval_every=args.eval_every, lr=args.lr, batch_size=args.batch_size,
                eval_batches=args.eval_batches, reference=args.reference, target_loss=args.target_loss,
                seed=args.seed, stop_at_target=args.stop_at_target)


def cmd_attack(args) -> int:
    from pipeline.experiments.finetune import attack

    r = attack(args.checkpoint, args.out, _cmd(), ablate=args.ablate, name=args.name, **_attack_kwargs(args))
    print(f"[attack] forget loss {r['forget_loss_start']:.3f} -> {r['forget_loss_end']:.3f}; "
          f"steps to threshold {r['threshold']}: {r['steps_to_threshold']}")
    return 0


def cmd_rmu(args) -> int:
    from pipeline.experiments.finetune import attack, rmu

    cmd = _cmd()
    r = rmu(args.checkpoint, args.out, cmd, layer=args.layer, coeff=args.coeff, alpha=args.alpha,
            steps=args.rmu_steps, lr=args.rmu_lr, batch_size=args.batch_size, seed=args.seed)
    print(f"[rmu] forget {r['loss_before']['forget']:.3f} -> {r['loss_after']['forget']:.3f}; "
          f"retain {r['loss_before']['retain']:.3f} -> {r['loss_after']['retain']:.3f}")
    if not args.no_attack:
        a = attack(r["model_dir"], args.out, cmd, ablate="no", name="attack_rmu", **_attack_kwargs(args))
        print(f"[rmu] attack: steps to threshold {a['threshold']}: {a['steps_to_threshold']}")
    return 0


def cmd_report(args) -> int:
    from pipeline.experiments.report import build_report

    path = build_report(args.runs, args.out, args.title, args.intro, args.name, command=_cmd(), readme=args.readme)
    print(f"[report] wrote {path}")
    return 0
