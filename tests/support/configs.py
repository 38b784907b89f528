"""Tiny configs, one builder: :func:`tiny_config` (2 blocks, d=32, two forget domains) and the
named variants the tests share, each a set of overrides on it (GQA, MQA, MoE, the PP/TP/DP run
layouts); and the tiny ``sgtm train`` overrides on the bundled bilingual data."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import load_config
from tests.support import ROOT

VOCAB = 97  # padded to 128 by the model
SEQ = 16


def tiny_config(arch: str = "gpt-neo", strategy: str = "sgtm", tp: int = 1, two_domains: bool = True,
                joint_update: str = "non_forget", **extra):
    """2 blocks, d=32, 4 heads, d_ff=64. Domain 'es' owns head 1 and units that straddle the TP=2
    boundary (32); domain 'fr' owns head 2 (on the other TP=2 rank) and two units."""
    domains = [{"name": "es", "heads": [1], "units": [3, 10, 31, 32, 40]}]
    if two_domains:
        domains.append({"name": "fr", "heads": [2], "units": [5, 60]})
    data = {
        "model": {"arch": arch, "n_layers": 2, "d_model": 32, "n_heads": 4, "d_ff": 64,
                  "vocab_size": VOCAB, "max_seq_len": SEQ, **extra.pop("model", {})},
        "sgtm": {"strategy": strategy, "domains": domains, "joint_update": joint_update, **extra.pop("sgtm", {})},
        "engine": {"tensor_parallel": tp, **extra.pop("engine", {})},
        "train": {"seed": 1234, **extra.pop("train", {})},
        **extra,
    }
    return load_config(data=data)


def case_config(case: dict, tp: int = 1, **extra):
    """:func:`tiny_config` of a named case ``{arch, strategy, two_domains, model, sgtm}`` (all but
    ``arch`` optional; other keys, such as a mutation, are the caller's)."""
    return tiny_config(case["arch"], case.get("strategy", "sgtm"), tp=tp, two_domains=case.get("two_domains", True),
                       model=case.get("model", {}), sgtm=case.get("sgtm", {}), **extra)


# GQA (8 query heads, 2 KV heads: one KV group per TP=2 rank), RoPE, untied: the llama3 shape.
GQA = {"arch": "llama3", "model": {"n_heads": 8, "n_kv_heads": 2}, "two_domains": False,
       "sgtm": {"domains": [{"name": "es", "heads": [4, 5, 6, 7], "units": [3, 10, 31, 32, 40]}]}}


def gqa_config(n_kv: int, heads: list[int], tp: int = 1, strategy: str = "sgtm"):
    """8 query heads of dim 4 (d=32); ``heads``: the forget domain's query heads (whole groups)."""
    return tiny_config("llama3", strategy, tp=tp, two_domains=False, model={"n_heads": 8, "n_kv_heads": n_kv},
                       sgtm={"domains": [{"name": "es", "heads": heads, "units": [3, 10, 31, 32, 40]}]})


MQA_TP2 = {"model": {"n_heads": 8, "n_kv_heads": 1},
           "sgtm": {"domains": [{"name": "es", "heads": [], "units": [3, 10, 31, 32, 40]}]},
           "engine": {"zero_stage": 1, "micro_batch_size": 6, "grad_clip": 1.0},
           "optimizer": {"lr": 3e-3, "weight_decay": 0.1}, "train": {"steps": 10}}


def mqa_config(tp: int):
    """llama3, 8 query heads and one KV head (replicated at TP=2), ZeRO-1: the checkpoint test's model."""
    return tiny_config("llama3", "sgtm", tp=tp, two_domains=False, **MQA_TP2)


# Two domains: 'es' owns routed expert 1 (EP rank 0 at EP=2) and a KV group; 'fr' owns expert 2
# (EP rank 1). With a shared expert, 'es' also owns two of its units.
ES = {"name": "es", "heads": [0, 1], "units": 0, "experts": [1]}
FR = {"name": "fr", "heads": 0, "units": 0, "experts": [2]}


def moe_config(ep: int = 1, tp: int = 1, shared: int = 0, capacity: float | None = None, arch: str = "llama3",
               joint_update: str = "non_forget", engine: dict | None = None, model: dict | None = None,
               sgtm: dict | None = None, **extra):
    """2 blocks, d=32, 4 heads / 2 KV heads (llama3), 4 routed experts of width 64, top-2."""
    es = dict(ES, units=[3, 40]) if shared else ES
    m = {"n_experts": 4, "moe_top_k": 2, "moe_shared_experts": shared, "moe_capacity_factor": capacity,
         **({"n_kv_heads": 2} if arch == "llama3" else {}), **(model or {})}
    s = {"domains": [es, FR], **(sgtm or {})}
    return tiny_config(arch, "sgtm", tp=tp, joint_update=joint_update, model=m, sgtm=s,
                       engine={"expert_parallel": ep, **(engine or {})}, **extra)


BLOCKS = 4  # layout_config: two blocks per stage at PP=2 (the stage's layers share its masks)


def layout_config(run: dict, steps: int):
    """A tiny experiment for ``run``: {pp, tp, zero, gas, clip, sp, precision, arch}, 4 blocks, a
    global batch of 4 rows split over the data-parallel ranks of this world (WORLD_SIZE)."""
    dp = int(os.environ.get("WORLD_SIZE", "1")) // (run.get("tp", 1) * run.get("pp", 1))
    over = GQA if run.get("arch") == "llama3" else {"arch": run.get("arch", "llama")}
    return tiny_config(over["arch"], "sgtm", tp=run.get("tp", 1), two_domains=over.get("two_domains", True),
                       model={"n_layers": BLOCKS, **over.get("model", {})}, sgtm=over.get("sgtm", {}),
                       engine={"pipeline_parallel": run.get("pp", 1), "zero_stage": run.get("zero", 1),
                               "micro_batch_size": 4 // dp // run.get("gas", 1), "grad_accum_steps": run.get("gas", 1),
                               "grad_clip": run.get("clip", 0.0), "sequence_parallel": run.get("sp", False),
                               "precision": run.get("precision", "fp32")},
                       optimizer={"lr": 3e-3, "weight_decay": 0.1}, train={"steps": steps},
                       eval={"calibrate": False})


# ------------------------------------------------------------------------------ `sgtm train` runs

TRAIN_CONFIG = ROOT / "configs" / "experiments" / "bilingual_tiny.yaml"


def tiny_overrides(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    """``key=value`` overrides of :data:`TRAIN_CONFIG` for a tiny run on ``data_dir`` (the bilingual
    demo data with a 1024-token BPE, :func:`tests.support.data.bilingual_demo`)."""
    o = {
        "model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4, "model.d_ff": 256, "model.max_seq_len": 64,
        "model.vocab_size": 1024, "sgtm.domains": "[{name: spanish, heads: [1], units: 32}]",
        "engine.micro_batch_size": 4, "train.steps": 12, "train.log_every": 1, "optimizer.warmup_steps": 2,
        "eval.every": 6, "eval.batches": 1, "eval.batch_size": 4,
        "eval.calibration": "{steps: 20, batches: 1, tokens_per_step: 128}",
        "checkpoint.every": 4, "checkpoint.keep": 2, "run_dir": str(run_dir),
        "data.sources": f"[{{path: {data_dir}/en, true_label: retain}}, "
                        f"{{path: {data_dir}/es, true_label: 'forget:spanish'}}]",
        "data.tokenizer": str(data_dir / "bpe1024.json"), "data.num_workers": 0,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]
