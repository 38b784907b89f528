"""`sgtm demo`: the paper's bilingual TinyStories experiment at CPU scale, in one command.

English is retain data, Spanish the forget domain; 20% of Spanish is left unlabelled by the
noise simulator and 25% of English runs in retain mode. Three runs with the same model, steps
and loader seed: SGTM, weak data filtering (drop Spanish-tagged documents) and no filter. Each is
evaluated on held-out English and Spanish: full, ablated and calibrated loss.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.config import CONFIG_ROOT, load_config
from pipeline.sgtm.methods import BY_NAME, COLOURS, overrides

DEMO_CONFIG = CONFIG_ROOT / "experiments" / "demo.yaml"
METHODS = {name: overrides(name) for name in ("sgtm", "weak_filter", "no_filter")}  # name -> its overrides


def eval_history(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, hist in results.items():
        steps = [r["step"] for r in hist]
        c = COLOURS.get(name)
        ablated = name in BY_NAME and BY_NAME[name].ablates
        for ax, key in ((axes[0], "forget"), (axes[1], "retain")):
            ax.plot(steps, [r[f"{key}_full"] for r in hist], color=c, ls=":", label=f"{name} full")
            if ablated:
                ax.plot(steps, [r[f"{key}_ablated"] for r in hist], color=c, ls="--", label=f"{name} ablated")
                cal = [r for r in hist if f"{key}_calibrated" in r]  # eval.calibrate_at: final -> the last one
                ax.plot([r["step"] for r in cal], [r[f"{key}_calibrated"] for r in cal], "*-", color=c, ms=9,
                        label=f"{name} calibrated")
        # the trajectory of the deployed model without calibration (every evaluation has it); SGTM's
        # calibrated point(s) on top
        deployed = "ablated" if ablated else "full"
        axes[2].plot([r[f"retain_{deployed}"] for r in hist], [r[f"forget_{deployed}"] for r in hist], "o-", color=c,
                     label=f"{name} ({deployed})")
        cal = [r for r in hist if "retain_calibrated" in r and "forget_calibrated" in r]
        if ablated and cal:
            axes[2].plot([r["retain_calibrated"] for r in cal], [r["forget_calibrated"] for r in cal], "*", color=c,
                         ms=12, label=f"{name} (calibrated)")
    axes[0].set(title="held-out Spanish (forget) loss", xlabel="step", ylabel="nats/token")
    axes[1].set(title="held-out English (retain) loss", xlabel="step", ylabel="nats/token")
    axes[2].set(title="forget vs retain over training (deployed model)", xlabel="retain loss (lower is better)",
                ylabel="forget loss (higher is better)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(final: dict[str, dict]) -> str:
    head = ("| method | forget full | forget ablated | forget calibrated "
            "| retain full | retain ablated | retain calibrated |")
    rows = [head, "|" + " --- |" * 7]
    for name, r in final.items():
        cells = [f"{r.get(f'{s}_{k}', float('nan')):.3f}" for s in ("forget", "retain")
                 for k in ("full", "ablated", "calibrated")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run_demo(out: str | Path, overrides: list[str] | None = None, methods: list[str] | None = None) -> dict:
    from pipeline.data.prepare import prepare_bilingual
    from pipeline.train.loop import train

    out = Path(out)
    t0 = time.perf_counter()
    data = prepare_bilingual(out / "data", vocab_size=4096, undiscovered_rate=0.2, retain_fraction=0.25)
    src = data["sources"]
    data_overrides = [
        f"data.sources=[{{path: '{src[0]['path']}', true_label: retain}}, "
        f"{{path: '{src[1]['path']}', true_label: 'forget:spanish'}}]",
        f"data.tokenizer='{data['tokenizer']}'",
    ]
    final, history, timings = {}, {}, {}
    for name in methods or list(METHODS):
        run_dir = out / "runs" / name
        cfg = load_config(DEMO_CONFIG, data_overrides + METHODS[name] + [f"run_dir={run_dir}"] + (overrides or []))
        t = time.perf_counter()
        print(f"[demo] training {name} ({cfg.train.steps} steps) -> {run_dir}", flush=True)
        final[name] = train(cfg)
        timings[name] = time.perf_counter() - t
        if "preempted_at" in final[name]:  # SIGTERM: the run checkpointed; rerunning resumes nothing here
            raise SystemExit(f"[demo] stopped by SIGTERM during {name} (step {final[name]['preempted_at']})")
        history[name] = eval_history(run_dir)
    plot(history, out / "loss_curves.png")
    results = {"final": final, "history": history, "seconds": timings, "total_seconds": time.perf_counter() - t0,
               "command": "sgtm demo --out " + str(out) + (" " + " ".join(overrides) if overrides else "")}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = table(final)
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"[demo] {results['total_seconds']:.0f} s; wrote {out / 'results.json'} and {out / 'loss_curves.png'}")
    return results


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the bilingual SGTM vs filtering demo (CPU, ~15 min)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--methods", nargs="*", choices=list(METHODS))
    p.add_argument("overrides", nargs="*", help="key.path=value overrides for every run (e.g. train.steps=200)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    run_demo(args.out, args.overrides, args.methods)
    return 0
