"""Expected GPU memory per rank for an experiment config, computed from its shapes.

    python tools/memory_estimate.py configs/experiments/llama_7b_8xh100.yaml [more configs] \
        [--gpus 8] [--overrides engine.micro_batch_size=2 ...] [--json]

What is counted (bytes per GPU; P = parameters this rank holds = TP-sharded / tp + replicated,
N = data-parallel size = gpus / tp; DeepSpeed 0.19 with the engine's config, see
pipeline/engine/engine.py):

* weights: P x 2 (bf16) or 4 (fp32);
* gradients: the bf16/fp32 gradient of every local parameter (ZeRO 0/1), or only this rank's
  1/N partition plus DeepSpeed's gradient bucket (ZeRO 2: reduce_bucket_size = 5e8 elements,
  the default, contiguous_gradients on); bf16 adds the fp32 copy of the partition made at the step;
* optimizer: fp32 master weights (bf16 only; ZeRO 1/2 also clone them for fp32) and Adam's exp_avg
  and exp_avg_sq, 4 + 8 bytes per parameter, divided by N under ZeRO 1/2;
* activations kept for the backward of one micro-batch (no recomputation: the model has none),
  from the tensors each op of pipeline/model/transformer.py saves, per token and block
  (d = d_model, f = d_ff, t = tp):
    gpt-neo: 6d + 5d/t + 2f/t elements   (LayerNorm input, its output, the affine output, twice;
             the qkv output, attention output, out-proj input; fc1 output, GELU output)
    llama:   8d + 7d/t + 4f/t elements   (RMSNorm also keeps an fp32 copy of its input: +2d in
             bf16; RoPE: the rotated q and k, +2d/t; SwiGLU: fc1 = [gate; up], silu(gate), product)
  plus attention's log-sum-exp (fp32, heads/t per token), the additive bias fused attention keeps
  for the document mask (b x s^2 x 2 bytes per block), the boolean mask itself, the final norm,
  and the vocab-parallel loss's fp32 softmax (tokens x vocab/t x 4).
  tests/test_launch.py checks this count against the bytes autograd actually saves (fp32, CPU).

Not counted: the CUDA context and NCCL buffers (~1-3 GB), allocator fragmentation, DataLoader
pinned memory. Leave 10-15 GB of an 80 GB H100 for them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ConfigError, ExperimentConfig, ModelConfig, load_config  # noqa: E402

GiB = 1024**3
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


@dataclass
class Estimate:
    name: str
    params_total: int
    params_per_gpu: int
    tp: int
    dp: int
    zero: int
    precision: str
    micro_batch: int
    seq: int
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def param_split(m: ModelConfig) -> tuple[int, int]:
    """(TP-sharded, replicated) parameter counts of the model as built (padded vocabulary)."""
    d, f, v, layers = m.d_model, m.d_ff, m.padded_vocab_size, m.n_layers
    b = int(bool(m.bias))
    qkv = (d + 2 * m.kv_dim) * (d + b)  # grouped-query: K/V rows for n_kv_heads only
    out = d * d
    fc1 = (2 * f * (d + b)) if m.mlp == "swiglu" else (d * f + f * b)
    fc2 = f * d
    sharded = layers * (qkv + out + fc1 + fc2) + v * d + (0 if m.tie_embeddings else v * d)
    norm = d * (1 if m.norm == "rmsnorm" else 2)
    replicated = layers * (2 * norm + 2 * d * b) + norm + (m.max_seq_len * d if m.positions == "learned" else 0)
    return sharded, replicated


def activation_bytes(m: ModelConfig, tp: int, micro_batch: int, seq: int, act_bytes: int,
                     doc_mask: bool = True) -> float:
    d, f, tokens = m.d_model, m.d_ff, micro_batch * seq
    if m.mlp == "swiglu":
        per_token = 8 * d + 7 * d / tp + 4 * f / tp
    else:
        per_token = 6 * d + 5 * d / tp + 2 * f / tp
    per_token -= 2 * (d - m.kv_dim) / tp  # grouped-query: the saved qkv output has K/V for n_kv_heads only
    if act_bytes == 4 and m.norm == "rmsnorm":
        per_token -= 2 * d  # the fp32 copy in RMSNorm is the input itself
    block = tokens * per_token * act_bytes + tokens * (m.n_heads / tp) * 4  # + log-sum-exp
    if doc_mask:
        block += micro_batch * seq * seq * act_bytes  # additive mask bias kept by fused attention
    final_norm = tokens * (4 if m.norm == "rmsnorm" and act_bytes == 2 else 3) * d * act_bytes
    vocab = m.padded_vocab_size / tp
    loss = tokens * vocab * 4  # the fp32 softmax the vocab-parallel loss computes in place and keeps
    mask = micro_batch * seq * seq if doc_mask else 0
    return m.n_layers * block + final_norm + loss + mask


def estimate(cfg: ExperimentConfig, gpus: int, name: str = "") -> Estimate:
    m, e = cfg.model, cfg.engine
    tp = e.tensor_parallel
    if gpus % tp:
        raise SystemExit(f"{name}: tensor_parallel={tp} does not divide {gpus} GPUs")
    dp = gpus // tp
    sharded, replicated = param_split(m)
    p = sharded // tp + replicated
    bf16 = e.precision == "bf16"
    wb = 2 if bf16 else 4
    weights = p * wb
    if e.zero_stage == 2:
        grads = p * wb / dp + min(REDUCE_BUCKET, p) * wb + (p / dp * 4 if bf16 else 0)
    else:
        grads = p * wb + (p / dp * 4 if bf16 and e.zero_stage == 1 else 0)
    master = 4 if (bf16 or e.zero_stage > 0) else 0
    optimizer = p * (master + 8) / (dp if e.zero_stage > 0 else 1)
    acts = activation_bytes(m, tp, e.micro_batch_size, m.max_seq_len, wb)
    return Estimate(name or cfg.name, m.num_params(), p, tp, dp, e.zero_stage, e.precision, e.micro_batch_size,
                    m.max_seq_len, weights / GiB, grads / GiB, optimizer / GiB, acts / GiB)


def table(rows: list[Estimate], gpus: int) -> str:
    head = (f"| config | params | TP x DP | ZeRO | precision | micro-batch x seq | params/GPU | weights | grads "
            f"| optimizer | activations | total/GPU ({gpus} GPUs) |")
    lines = [head, "|" + " --- |" * 12]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.params_total / 1e9:.2f}B | {r.tp} x {r.dp} | {r.zero} | {r.precision} "
            f"| {r.micro_batch} x {r.seq} | {r.params_per_gpu / 1e9:.2f}B | {r.weights:.1f} GiB | {r.grads:.1f} GiB "
            f"| {r.optimizer:.1f} GiB | {r.activations:.1f} GiB | **{r.total:.1f} GiB** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="experiment YAMLs")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default: one 8-GPU node)")
    ap.add_argument("--overrides", nargs="*", default=[], help="key=value overrides applied to every config")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        rows = [estimate(load_config(c, args.overrides), args.gpus, Path(c).stem) for c in args.configs]
    except ConfigError as exc:
        raise SystemExit(f"memory_estimate: {exc}") from None
    if args.json:
        print(json.dumps([{**asdict(r), "total": r.total} for r in rows], indent=2))
    else:
        print(table(rows, args.gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
