"""Expected GPU memory per rank for an experiment config, computed from its shapes.

    python tools/memory_estimate.py configs/experiments/llama3_8b_8xh100.yaml [more configs] \
        [--gpus 8] [--overrides engine.micro_batch_size=2 ...] [--json]

What is counted (bytes per GPU of the pipeline stage that needs the most; P = parameters this
rank holds: its stage's blocks (n_layers / PP of them; the first stage also holds the embeddings,
the last the final norm and LM head), TP-sharded ones / tp, replicated ones whole, K/V rows of
a KV head replicated over TP ranks (n_kv_heads < TP) once per copy; N = data-parallel size =
gpus / (tp x pp); DeepSpeed 0.19 with the engine's config, see pipeline/engine/engine.py):

* weights: P x 2 (bf16) or 4 (fp32);
* gradients: the bf16/fp32 gradient of every local parameter (ZeRO 0/1), or only this rank's
  1/N partition plus DeepSpeed's gradient bucket (ZeRO 2: reduce_bucket_size = 5e8 elements,
  the default, contiguous_gradients on); bf16 adds the fp32 copy of the partition made at the step;
* optimizer: fp32 master weights (bf16 only; ZeRO 1/2 also clone them for fp32) and Adam's exp_avg
  and exp_avg_sq, 4 + 8 bytes per parameter, divided by N under ZeRO 1/2;
* activations kept for the backward, from the tensors each op of pipeline/model/transformer.py
  saves, per token and block (d = d_model, f = d_ff, t = tp; kv = n_kv_heads x head_dim, the
  width of K or of V, at least one head per rank when KV heads are replicated):
    gpt-neo: 6d + (3d + 2kv)/t + 2f/t elements   (LayerNorm input, its output, the affine output,
             twice; the qkv output, attention output, out-proj input; fc1 output, GELU output)
    llama:   8d + (4d + 3kv)/t + 4f/t elements   (RMSNorm keeps an fp32 copy of its input instead:
             +2d in bf16; RoPE: the rotated q and k, +(d + kv)/t; SwiGLU: fc1 = [gate; up],
             silu(gate), product)
  plus attention's log-sum-exp (fp32, heads/t per token), the additive bias fused attention keeps
  for the document mask (b x s^2 x 2 bytes per block), the boolean mask itself, the final norm,
  and the vocab-parallel loss's fp32 softmax (tokens x vocab/t x 4).
  - sequence parallelism (``engine.sequence_parallel``): each norm's input, fp32 copy and output
    are this rank's s/t tokens, but the column-parallel linear after it saves its input gathered
    along the sequence (d per token, as this model's SplitColumnLinear does; megatron re-gathers
    it in the backward instead): per norm 2d/t (+d/t fp32 copy in bf16) + d instead of 3d (4d).
  - full activation recompute (megatron's ``recompute_granularity=full``, uniform, one block a
    chunk): each block keeps only its input (d, SP: d/t per token) and one block's activations
    are live again during its backward. **The pipeline does not implement recompute yet**: these
    columns say what it would buy, they are not a setting.
  - pipeline parallelism: DeepSpeed's 1F1B schedule keeps the activations of up to
    min(pp - stage, grad_accum_steps) micro-batches on a stage; the first stage holds the most
    (pp of them), the last the LM head's loss.
  tests/test_launch.py checks the count against the bytes autograd actually saves (fp32, CPU), and
  tools/bench_memory.py against small CPU runs at TP1/TP2/SP (docs/benchmarks.md, "Memory").

Not counted: the CUDA context and NCCL buffers (~1-3 GB), allocator fragmentation, DataLoader
pinned memory, pipeline send/receive buffers (a few activations of one micro-batch). Leave 10-15
GB of an 80 GB H100 for them. Mixture-of-experts models are not modelled (refused).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ConfigError, ExperimentConfig, ModelConfig, load_config  # noqa: E402
from pipeline.model.shapes import block_shapes, model_shapes, num_params, per_rank  # noqa: E402

GiB = 1024**3
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


@dataclass
class Estimate:
    """One rank's memory (GiB) on the pipeline stage ``stage`` (the one that needs the most)."""

    name: str
    params_total: int
    params_per_gpu: int
    tp: int
    pp: int
    dp: int
    zero: int
    precision: str
    micro_batch: int
    seq: int
    sequence_parallel: bool
    stage: int
    in_flight: int  # micro-batches whose activations the stage holds at once
    weights: float
    grads: float
    optimizer: float
    act: float  # no SP, no recompute
    act_sp: float | None  # with SP (None at TP=1)
    act_recompute: float  # full recompute, no SP
    act_sp_recompute: float | None

    @property
    def activations(self) -> float:
        """What the config runs with (SP as set; no recompute: the pipeline has none)."""
        return self.act_sp if self.sequence_parallel and self.act_sp is not None else self.act

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.static + self.activations

    @property
    def total_sp_recompute(self) -> float:
        return self.static + (self.act_sp_recompute if self.act_sp_recompute is not None else self.act_recompute)


def block_params(m: ModelConfig, tp: int) -> tuple[int, int]:
    """(TP-sharded elements this rank holds, replicated elements) of one block at TP=``tp``, from
    the model's shapes (:mod:`pipeline.model.shapes`). With n_kv_heads < TP each rank holds a whole
    copy of one KV head (its K/V rows)."""
    return per_rank(block_shapes(m, tp), tp)


def _outside_blocks(m: ModelConfig, tp: int, stage: str) -> tuple[int, int]:
    """(sharded per rank, replicated) of what the first stage (embeddings) or the last (final
    norm, LM head) holds besides its blocks, vocabulary padded as built."""
    return per_rank([s for s in model_shapes(m, tp, padded=True) if s.stage == stage], tp)


def param_split(m: ModelConfig) -> tuple[int, int]:
    """(TP-sharded, replicated) parameter counts of the whole model as built (padded vocabulary)."""
    sharded_block, replicated_block = block_params(m, 1)
    (s0, r0), (s1, r1) = _outside_blocks(m, 1, "first"), _outside_blocks(m, 1, "last")
    return m.n_layers * sharded_block + s0 + s1, m.n_layers * replicated_block + r0 + r1


def stage_params(m: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters one rank of pipeline stage ``stage`` holds (its blocks; embeddings on the first
    stage, final norm and LM head on the last; all of it at PP=1)."""
    sharded_block, replicated_block = block_params(m, tp)
    p = (m.n_layers // pp) * (sharded_block + replicated_block)
    if stage == 0:
        p += sum(_outside_blocks(m, tp, "first"))
    if stage == pp - 1:
        p += sum(_outside_blocks(m, tp, "last"))
    return p


def _norm_saved(m: ModelConfig, act_bytes: int, tp: int, sp: bool) -> float:
    """Elements per token one norm and the column-parallel linear after it save."""
    fp32_copy = m.norm == "rmsnorm" and act_bytes == 2  # fp32 input copy (the input itself in fp32)
    local = 2 + int(fp32_copy)  # norm input (+ fp32 copy), normalised output
    if sp:
        return local * m.d_model / tp + m.d_model  # + the linear's gathered input
    return (local + 1) * m.d_model


def block_activation_bytes(m: ModelConfig, tp: int, micro_batch: int, seq: int, act_bytes: int,
                           doc_mask: bool = True, sp: bool = False) -> float:
    """Bytes one block saves for the backward of one micro-batch (per rank)."""
    d, f, tokens = m.d_model, m.d_ff, micro_batch * seq
    kv = m.head_dim * max(1, m.n_kv_heads // tp) * tp  # K (or V) width over all ranks (copies counted)
    # qkv output (q, k, v), attention output, out-projection input; RoPE: the rotated q and k
    per_token = 2 * _norm_saved(m, act_bytes, tp, sp) + (3 * d + 2 * kv) / tp
    if m.positions == "rope":
        per_token += (d + kv) / tp
    per_token += (4 if m.mlp == "swiglu" else 2) * f / tp  # [gate; up], silu(gate), product | fc1, GELU out
    block = tokens * per_token * act_bytes + tokens * (m.n_heads / tp) * 4  # + log-sum-exp
    if doc_mask:
        block += micro_batch * seq * seq * act_bytes  # additive mask bias kept by fused attention
    return block


def activation_bytes(m: ModelConfig, tp: int, micro_batch: int, seq: int, act_bytes: int,
                     doc_mask: bool = True, sp: bool = False, recompute: bool = False,
                     layers: int | None = None, last_stage: bool = True) -> float:
    """Bytes saved for the backward of one micro-batch on a rank holding ``layers`` blocks (all by
    default), with the final norm and loss if ``last_stage``."""
    d, tokens = m.d_model, micro_batch * seq
    layers = m.n_layers if layers is None else layers
    block = block_activation_bytes(m, tp, micro_batch, seq, act_bytes, doc_mask, sp)
    if recompute:  # each block's input, plus one block recomputed during its backward
        blocks = layers * tokens * (d / tp if sp else d) * act_bytes + block
    else:
        blocks = layers * block
    mask = micro_batch * seq * seq if doc_mask else 0
    if not last_stage:
        return blocks + mask
    final_norm = tokens * _norm_saved(m, act_bytes, tp, sp) * act_bytes
    loss = tokens * m.padded_vocab_size / tp * 4  # the fp32 softmax the vocab-parallel loss keeps
    return blocks + final_norm + loss + mask


def estimate(cfg: ExperimentConfig, gpus: int, name: str = "", stage: int | None = None) -> Estimate:
    """The estimate of the pipeline stage that needs the most (or of ``stage``)."""
    m, e = cfg.model, cfg.engine
    if getattr(m, "n_experts", 0):
        raise SystemExit(f"{name or cfg.name}: mixture-of-experts models are not modelled by this estimator")
    tp, pp = e.tensor_parallel, int(getattr(e, "pipeline_parallel", 1))
    if gpus % (tp * pp):
        raise SystemExit(f"{name}: tensor_parallel x pipeline_parallel = {tp * pp} does not divide {gpus} GPUs")
    dp = gpus // (tp * pp)
    bf16 = e.precision == "bf16"
    wb = 2 if bf16 else 4
    mb, seq = e.micro_batch_size, m.max_seq_len
    best = None
    for st in sorted({0, pp - 1}) if stage is None else [stage]:
        p = stage_params(m, tp, pp, st)
        weights = p * wb
        if e.zero_stage == 2:
            grads = p * wb / dp + min(REDUCE_BUCKET, p) * wb + (p / dp * 4 if bf16 else 0)
        else:
            grads = p * wb + (p / dp * 4 if bf16 and e.zero_stage == 1 else 0)
        master = 4 if (bf16 or e.zero_stage > 0) else 0
        optimizer = p * (master + 8) / (dp if e.zero_stage > 0 else 1)
        in_flight = min(pp - st, e.grad_accum_steps) if pp > 1 else 1
        kw = dict(layers=m.n_layers // pp, last_stage=st == pp - 1)

        def acts(sp: bool, rc: bool, kw=kw, in_flight=in_flight) -> float:
            return in_flight * activation_bytes(m, tp, mb, seq, wb, sp=sp, recompute=rc, **kw) / GiB

        est = Estimate(name or cfg.name, num_params(m), p, tp, pp, dp, e.zero_stage, e.precision, mb, seq,
                       bool(e.sequence_parallel), st, in_flight, weights / GiB, grads / GiB, optimizer / GiB,
                       acts(False, False), acts(True, False) if tp > 1 else None, acts(False, True),
                       acts(True, True) if tp > 1 else None)
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} GiB"


def table(rows: list[Estimate]) -> str:
    head = ("| config | GPUs | params | TP x PP x DP | ZeRO | precision | micro-batch x seq | stage (in flight) "
            "| params/GPU | weights | grads | optimizer | act. | act. SP | act. recompute | act. SP + recompute "
            "| total/GPU | total, SP + recompute |")
    lines = [head, "|" + " --- |" * 18]
    for r in rows:
        sp = " (SP on)" if r.sequence_parallel else ""
        lines.append(
            f"| {r.name} | {r.tp * r.pp * r.dp} | {r.params_total / 1e9:.2f}B | {r.tp} x {r.pp} x {r.dp} | {r.zero} "
            f"| {r.precision} "
            f"| {r.micro_batch} x {r.seq} | {r.stage} ({r.in_flight}) | {r.params_per_gpu / 1e9:.2f}B "
            f"| {_gib(r.weights)} | {_gib(r.grads)} | {_gib(r.optimizer)} | {_gib(r.act)} | {_gib(r.act_sp)} "
            f"| {_gib(r.act_recompute)} | {_gib(r.act_sp_recompute)} | **{r.total:.1f} GiB**{sp} "
            f"| {r.total_sp_recompute:.1f} GiB |")
    return "\n".join(lines)


MARKER = re.compile(r"^(<!-- memory_estimate: ([^\n]*?) -->\n)(.*?)^(<!-- /memory_estimate -->)",
                    re.DOTALL | re.MULTILINE)


def _rows(argv: list[str]) -> list[Estimate]:
    args = _parser().parse_args(argv)
    if not args.configs:
        raise SystemExit("memory_estimate: no config given")
    try:
        return [estimate(load_config(c, args.overrides), args.gpus, args.name or Path(c).stem) for c in args.configs]
    except ConfigError as exc:
        raise SystemExit(f"memory_estimate: {exc}") from None


def render_doc(text: str) -> str:
    """``text`` with every ``<!-- memory_estimate: ARGS [; ARGS ...] -->`` ... ``<!-- /memory_estimate -->``
    block's table replaced by this tool's output for those arguments (the rows of every ';'-separated
    invocation under one header), so the tables in the docs are the tool's output, not typed."""
    def one(m: re.Match) -> str:
        rows = [r for inv in m.group(2).split(" ; ") for r in _rows(shlex.split(inv))]
        return f"{m.group(1)}{table(rows)}\n{m.group(4)}"
    return MARKER.sub(one, text)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", help="experiment YAMLs")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default: one 8-GPU node)")
    ap.add_argument("--overrides", nargs="*", default=[], help="key=value overrides applied to every config")
    ap.add_argument("--name", help="row name (default: the config file's stem)")
    ap.add_argument("--no-header", action="store_true", help="table rows only (to append rows of several runs)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--doc", metavar="FILE", help="re-render the memory_estimate tables of FILE (a Markdown file)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.doc:
        doc = Path(args.doc)
        text = render_doc(doc.read_text())
        tmp = doc.with_name(f".{doc.name}.tmp")
        tmp.write_text(text)
        tmp.replace(doc)
        print(f"{doc}: {len(MARKER.findall(text))} tables rendered")
        return 0
    rows = _rows(argv if argv is not None else sys.argv[1:])
    if args.json:
        print(json.dumps([{**asdict(r), "activations": r.activations, "total": r.total,
                           "total_sp_recompute": r.total_sp_recompute} for r in rows], indent=2))
    else:
        out = table(rows)
        print("\n".join(out.splitlines()[2:]) if args.no_header else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
