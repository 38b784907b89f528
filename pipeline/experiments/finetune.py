"""Post-training experiments on a trained model, as small single-process loops on the TP=1 model:
the adversarial fine-tuning attack, RMU (post-hoc unlearning baseline) and the per-example
gradient-norm analysis.

* ``attack``: full fine-tuning (AdamW, every parameter) of the deployed model on a 50/50 mix of
  forget and retain training documents; forget loss on held-out forget data every k steps; the
  number of steps and tokens until it reaches a reference (the no-filter model's forget loss).
  SGTM / Gradient Routing / activation-masking models are ablated first (forget slices zeroed);
  filtered and plain models are attacked as they are.
* ``rmu``: Li et al.'s RMU on a model (the paper applies it to the no-filter model): on forget
  data, push the residual stream after block ``layer`` towards ``coeff * u`` (u a fixed random
  unit vector); on retain data keep it equal to the frozen model's; only the MLPs of blocks
  ``layer-2 .. layer`` learn. Writes a model directory that ``attack`` can then fine-tune.
* ``gradnorm``: per-example relative gradient norms |grad theta| / |theta| of the forget and the
  retain parameters on held-out forget and retain examples, without masking (paper Fig. 4b).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline.experiments.common import figure, write_analysis
from pipeline.experiments.stats import steps_to_threshold
from pipeline.sgtm.methods import ablates, method_of


def _load(checkpoint: str | Path):
    from pipeline.train.offline import load_any, single_process_model

    loaded = load_any(checkpoint)
    model, dist = single_process_model(loaded)
    return loaded, model, dist


def _split_stream(cfg, which: str, seed: int, batch_size: int, seq_len: int):
    """Training-split batches of documents whose true label is ``which`` ('forget' or 'retain'),
    unfiltered (the attacker has the data; tags do not matter)."""
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_loader

    raw = cfg.data.to_dict()
    raw.update(filter="none", keep_true=[f"forget:{cfg.data.domains[0]}"] if which == "forget" else ["retain"])
    return build_loader(DataConfig.from_dict(raw), seed=seed, micro_batch_size=batch_size, seq_len=seq_len)


@torch.no_grad()
def _mean_loss(model, batches, device) -> float:
    total, n = 0.0, 0
    for b in batches:
        per = model(b["input_ids"].to(device), labels=b["labels"].to(device), doc_ids=b["doc_ids"].to(device),
                    return_per_token=True)
        valid = (b["labels"] != -100).to(device)
        total += float(per[valid].sum())
        n += int(valid.sum())
    return total / max(n, 1)


def _eval_batches(cfg, n: int | None, batch_size: int):
    """Held-out forget / retain batches; ``n`` None: the whole held-out split."""
    from pipeline.data.loader import build_eval_batches

    out = {}
    for name in ("forget", "retain"):
        out[name] = build_eval_batches(cfg.data, name, seq_len=cfg.model.max_seq_len, batch_size=batch_size,
                                       max_batches=n)
    return out


def _reference_loss(reference: str | None, target: float | None,
                    batches: list[dict]) -> tuple[float | None, str | None]:
    """The attack's target: ``--target-loss``, or the reference model's (the no-filter run's) forget
    loss on exactly the batches the attack evaluates on, so the target and the attacked model's
    losses are measured on one set (the unablated reference model, no calibration bias)."""
    if target is not None:
        return float(target), "--target-loss"
    if reference is None:
        return None, None
    try:
        _, ref_model, ref_dist = _load(reference)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--reference: {reference}: not a run, checkpoint or model directory ({e})") from None
    ref_model.set_ablated([])
    ref_model.eval()
    return _mean_loss(ref_model, batches, ref_dist.device), f"{reference} (full model, the attack's forget batches)"


def _label(cfg, meta: dict) -> str:
    """What the attacked model is: its method (rmu for an RMU model directory)."""
    if meta.get("rmu"):
        return "rmu"
    name = method_of(cfg)
    if name == "weak_filter" and cfg.data.tagging.source == "simulated" and cfg.data.tagging.undiscovered_rate == 0:
        return "perfect_filter"
    return name


def attack(checkpoint: str, out: str, command: str, *, steps: int = 200, eval_every: int = 10, lr: float = 1e-3,
           batch_size: int = 8, eval_batches: int | None = None, reference: str | None = None,
           target_loss: float | None = None, ablate: str = "auto", seed: int = 0, name: str = "attack",
           stop_at_target: bool = False) -> dict:
    """Fine-tune the deployed model on 50/50 forget/retain training text; held-out forget loss every
    ``eval_every`` steps (retain loss at the start and the end), on the whole held-out split unless
    ``eval_batches`` limits it; the target is the reference model's forget loss on the same
    batches."""
    from pipeline.model.ablate import ablate as ablate_fn

    loaded, model, dist = _load(checkpoint)
    cfg = loaded.cfg
    device = dist.device
    strategy = cfg.sgtm.strategy
    already = bool(loaded.meta.get("ablated_domains"))
    do_ablate = (ablate == "yes") or (ablate == "auto" and ablates(strategy) and not already)
    if do_ablate:
        ablate_fn(model, None, how="zero")
    model.set_ablated([])  # zeroed slices stay in the graph: the attacker may train them
    seq = cfg.model.max_seq_len
    evals = _eval_batches(cfg, eval_batches, batch_size)
    threshold, ref_src = _reference_loss(reference, target_loss, evals["forget"])
    fstream = _split_stream(cfg, "forget", seed + 101, batch_size // 2, seq)
    rstream = _split_stream(cfg, "retain", seed + 202, batch_size - batch_size // 2, seq)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    history = []

    def record(step: int, retain: bool = False) -> None:
        model.eval()
        history.append({"step": step, "tokens": step * batch_size * seq,
                        "forget_loss": _mean_loss(model, evals["forget"], device),
                        "retain_loss": _mean_loss(model, evals["retain"], device) if retain else None})
        model.train()
        print(f"[{name}] step {step}: forget {history[-1]['forget_loss']:.3f}", flush=True)

    t0 = time.perf_counter()
    record(0, retain=True)
    model.train()
    for step in range(1, steps + 1):
        fb, rb = next(fstream), next(rstream)
        batch = {k: torch.cat([fb[k], rb[k]]) for k in ("input_ids", "labels", "doc_ids")}
        opt.zero_grad(set_to_none=True)
        lossv = model(batch["input_ids"].to(device), labels=batch["labels"].to(device),
                      doc_ids=batch["doc_ids"].to(device))
        lossv.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % eval_every == 0 or step == steps:
            record(step)
            if stop_at_target and threshold is not None and history[-1]["forget_loss"] <= threshold:
                break
    if history[-1]["retain_loss"] is None:
        model.eval()
        history[-1]["retain_loss"] = _mean_loss(model, evals["retain"], device)
    fstream.close()
    rstream.close()
    reached = steps_to_threshold([h["step"] for h in history], [h["forget_loss"] for h in history], threshold) \
        if threshold is not None else {"step": None, "interpolated": None}
    tok = batch_size * seq
    result = {"checkpoint": str(checkpoint), "strategy": strategy, "filter": cfg.data.filter,
              "label": _label(cfg, loaded.meta), "model_seed": cfg.train.seed, "attack_seed": seed,
              "eval_tokens": {k: sum(int((b["labels"] != -100).sum()) for b in v) for k, v in evals.items()},
              "eval_every": eval_every, "ablated": do_ablate or already,
              "threshold": threshold, "threshold_source": ref_src, "steps_to_threshold": reached["step"],
              "steps_to_threshold_interpolated": reached["interpolated"],
              "tokens_to_threshold": reached["step"] * tok if reached["step"] is not None else None,
              "tokens_per_step": tok, "lr": lr, "batch_size": batch_size, "steps": history[-1]["step"],
              "forget_loss_start": history[0]["forget_loss"], "forget_loss_end": history[-1]["forget_loss"],
              "retain_loss_start": history[0]["retain_loss"], "retain_loss_end": history[-1]["retain_loss"],
              "history": history, "seconds": time.perf_counter() - t0}
    fig, (ax,) = figure(1)
    ax.plot([h["step"] for h in history], [h["forget_loss"] for h in history], "o-", label="forget (held out)")
    ax.plot([h["step"] for h in history if h["retain_loss"] is not None],
            [h["retain_loss"] for h in history if h["retain_loss"] is not None], "s", label="retain (held out)")
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=1, label="no-filter model's forget loss")
    ax.set(title=f"fine-tuning attack on {Path(checkpoint).name} ({strategy}, filter {cfg.data.filter})",
           xlabel="fine-tuning step (50/50 forget/retain)", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    rows = [{"checkpoint": str(checkpoint), "steps_to_threshold": reached["step"],
             "tokens_to_threshold": result["tokens_to_threshold"], "forget_start": result["forget_loss_start"],
             "forget_end": result["forget_loss_end"], "threshold": threshold}]
    write_analysis(out, name, {"title": f"Fine-tuning attack: {name}", "command": command, "inputs": [str(checkpoint)],
                               "results": result, "table": rows, "claims": []}, fig)
    return result


# ------------------------------------------------------------------------------------------- RMU


def rmu(checkpoint: str, out: str, command: str, *, layer: int | None = None, coeff: float = 20.0,
        alpha: float = 100.0, steps: int = 80, lr: float = 5e-4, batch_size: int = 8, seed: int = 0) -> dict:
    from pipeline.model.tp_state import gather_full_state_dict
    from pipeline.train.offline import write_model_dir

    loaded, model, dist = _load(checkpoint)
    cfg = loaded.cfg
    device = dist.device
    L = cfg.model.n_layers
    layer = max(0, L // 2 - 1) if layer is None else layer
    if not 0 <= layer < L:
        raise ValueError(f"--layer: expected 0..{L - 1}, got {layer}")
    frozen, _ = _load(checkpoint)[1:]
    frozen.eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    trainable = []
    for i in range(max(0, layer - 2), layer + 1):
        trainable += list(model.blocks[i].mlp.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(cfg.model.d_model, generator=gen)
    u = (u / u.norm()).to(device)
    grabbed = {}

    def hook(key):
        def fn(module, inputs, output):
            grabbed[key] = output
        return fn

    h1 = model.blocks[layer].register_forward_hook(hook("model"))
    h2 = frozen.blocks[layer].register_forward_hook(hook("frozen"))
    seq = cfg.model.max_seq_len
    fstream = _split_stream(cfg, "forget", seed + 11, batch_size, seq)
    rstream = _split_stream(cfg, "retain", seed + 22, batch_size, seq)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    evals = _eval_batches(cfg, None, batch_size)  # the whole held-out split
    before = {k: _mean_loss(model, v, device) for k, v in evals.items()}
    log = []
    model.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        fb, rb = next(fstream), next(rstream)
        opt.zero_grad(set_to_none=True)
        model(fb["input_ids"].to(device), doc_ids=fb["doc_ids"].to(device), return_hidden=True)
        hf = grabbed["model"]
        valid_f = (fb["labels"] != -100).to(device)
        loss_f = ((hf - coeff * u) ** 2).sum(-1)[valid_f].mean() / cfg.model.d_model
        model(rb["input_ids"].to(device), doc_ids=rb["doc_ids"].to(device), return_hidden=True)
        hr = grabbed["model"]
        with torch.no_grad():
            frozen(rb["input_ids"].to(device), doc_ids=rb["doc_ids"].to(device), return_hidden=True)
        valid_r = (rb["labels"] != -100).to(device)
        loss_r = ((hr - grabbed["frozen"]) ** 2).sum(-1)[valid_r].mean() / cfg.model.d_model
        total = loss_f + alpha * loss_r
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step % 10 == 0 or step == steps:
            log.append({"step": step, "forget_steer": float(loss_f), "retain_keep": float(loss_r)})
            print(f"[rmu] step {step}: forget steer {float(loss_f):.3f} retain keep {float(loss_r):.5f}", flush=True)
    h1.remove()
    h2.remove()
    fstream.close()
    rstream.close()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    after = {k: _mean_loss(model, v, device) for k, v in evals.items()}
    loaded.state = gather_full_state_dict(model)
    loaded.meta = {**loaded.meta, "rmu": {"layer": layer, "coeff": coeff, "alpha": alpha, "steps": steps, "lr": lr}}
    model_dir = write_model_dir(loaded, Path(out) / "rmu_model")
    result = {"checkpoint": str(checkpoint), "model_dir": str(model_dir), "layer": layer,
              "updated_blocks": list(range(max(0, layer - 2), layer + 1)), "coeff": coeff, "alpha": alpha,
              "steps": steps, "lr": lr, "loss_before": before, "loss_after": after, "log": log,
              "seconds": time.perf_counter() - t0}
    fig, (ax,) = figure(1)
    ax.bar(["forget before", "forget after", "retain before", "retain after"],
           [before["forget"], after["forget"], before["retain"], after["retain"]],
           color=["tab:red", "tab:red", "tab:blue", "tab:blue"], alpha=0.7)
    ax.set(title=f"RMU (layer {layer}, c={coeff}, alpha={alpha}, {steps} steps)", ylabel="held-out loss")
    write_analysis(out, "rmu", {"title": "RMU (post-hoc unlearning baseline)", "command": command,
                                "inputs": [str(checkpoint)], "results": result,
                                "table": [{"set": k, "before": before[k], "after": after[k]} for k in before],
                                "claims": []}, fig)
    return result


# -------------------------------------------------------------------------------------- gradnorm


def _slices(model) -> list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]]:
    """(param, forget mask, retain mask) for every parameter with forget slices (split matrices)."""
    from pipeline.codes import ParamClass

    out = []
    for p in model.parameters():
        role = p.sgtm_role
        if not role.forget_domains:
            continue
        f = role.slice_mask(p, {0}).expand_as(p)
        r = role.slice_mask(p, {ParamClass.RETAIN}).expand_as(p)
        out.append((p, f, r))
    return out


def gradnorm(checkpoint: str, out: str, command: str, *, examples: int = 48) -> dict:
    loaded, model, dist = _load(checkpoint)
    cfg = loaded.cfg
    device = dist.device
    model.set_ablated([])
    model.strategy = "none"  # no masking: the plain gradient of each example
    sl = _slices(model)
    if not sl:
        raise ValueError(f"{checkpoint}: the model has no forget parameters")
    with torch.no_grad():
        norm_f = float(torch.sqrt(sum((p[f] ** 2).sum() for p, f, _ in sl)))
        norm_r = float(torch.sqrt(sum((p[r] ** 2).sum() for p, _, r in sl)))
    from pipeline.data.loader import build_eval_batches

    res = {}
    model.eval()
    for name in ("forget", "retain"):
        batches = build_eval_batches(cfg.data, name, seq_len=cfg.model.max_seq_len, batch_size=8,
                                     max_batches=-(-examples // 8))
        rows = [(b, i) for b in batches for i in range(b["input_ids"].shape[0])][:examples]
        rel_f, rel_r = [], []
        for b, i in rows:
            if int((b["labels"][i] != -100).sum()) == 0:
                continue
            model.zero_grad(set_to_none=True)
            lossv = model(b["input_ids"][i:i + 1].to(device), labels=b["labels"][i:i + 1].to(device),
                          doc_ids=b["doc_ids"][i:i + 1].to(device))
            lossv.backward()
            gf = float(torch.sqrt(sum((p.grad[f] ** 2).sum() for p, f, _ in sl)))
            gr = float(torch.sqrt(sum((p.grad[r] ** 2).sum() for p, _, r in sl)))
            rel_f.append(gf / norm_f)
            rel_r.append(gr / norm_r)
        res[name] = {"forget_params": rel_f, "retain_params": rel_r}
    model.zero_grad(set_to_none=True)
    summary = []
    for ex in ("forget", "retain"):
        f, r = np.array(res[ex]["forget_params"]), np.array(res[ex]["retain_params"])
        summary.append({"examples": ex, "n": int(f.size), "forget_params_median": float(np.median(f)),
                        "retain_params_median": float(np.median(r)), "ratio_median": float(np.median(f / r))})
    fig, axes = figure(2)
    for ax, ex in zip(axes, ("forget", "retain")):
        f, r = np.array(res[ex]["forget_params"]), np.array(res[ex]["retain_params"])
        bins = np.geomspace(max(min(f.min(), r.min()), 1e-8), max(f.max(), r.max()), 40)
        ax.hist(f, bins=bins, alpha=0.5, density=True, label="theta_forget", color="tab:red")
        ax.hist(r, bins=bins, alpha=0.5, density=True, label="theta_retain", color="tab:blue")
        ax.set(xscale="log", title=f"{ex} examples (no masking)", xlabel="|grad theta| / |theta| per example",
               ylabel="density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    by = {s["examples"]: s for s in summary}
    claims = [{"claim": "forget examples move theta_forget relatively more than retain examples do (absorption)",
               "paper": "Fig. 4b: forget data's relative gradient concentrates in forget parameters",
               "here": f"median |g_f|/|g_r| relative ratio: forget examples {by['forget']['ratio_median']:.2f}, "
                       f"retain examples {by['retain']['ratio_median']:.2f} (one run: no interval over seeds)",
               "holds": "inconclusive",
               "one_run_direction": by["forget"]["ratio_median"] > by["retain"]["ratio_median"]}]
    payload = {"title": "Per-example relative gradient norms (paper Fig. 4b)", "command": command,
               "inputs": [str(checkpoint)], "param_norms": {"forget": norm_f, "retain": norm_r},
               "table": summary, "per_example": res, "claims": claims}
    write_analysis(out, "gradnorm", payload, fig)
    return payload
