"""An independent, minimal SGTM trainer in the style of the paper's official code: the comparison
harness for ``sgtm bench`` (tools/bench_train.py). It shares no model or masking code with
``pipeline``; it only reads the same batch file and writes the same JSON fields.

What it does (what the official code does, written from its description, not copied):

* Model: Hugging Face ``GPTNeoForCausalLM`` built from a local ``GPTNeoConfig`` (no hub download),
  eager attention (GPT-Neo's only CPU implementation), all-global causal attention over the packed
  sequence (no document mask), exact GELU, no dropout, tied embeddings.
* Optimizer: plain ``torch.optim.AdamW`` (decay on matrices and embeddings, not on norms and
  biases), global ``clip_grad_norm_``.
* Partition: the *last* ``forget_heads`` heads of every block (their rows of q/k/v_proj and input
  columns of out_proj) and the *last* ``forget_units`` MLP units (rows of c_fc and its bias, input
  columns of c_proj) are forget parameters; everything else in the blocks is retain; embeddings and
  layer norms are joint and, as in the pipeline's ``joint_update: non_forget``, masked on forget
  steps (the official code leaves ln_f unmasked; here every joint parameter is masked).
* Every optimizer step is homogeneous: one label per step (``default`` = unlabelled, ``retain``,
  ``forget``), drawn so that the share of steps of each label equals the share of tokens of each
  mode in the batch file (largest-remainder schedule, deterministic).
  - ``forget`` step: normal forward and backward, then ``param.grad`` of every retain slice, both
    output biases and every joint parameter is zeroed in place before clipping and the step;
  - ``retain`` step: forward hooks zero the forget heads' outputs (the input columns of out_proj)
    and the forget units' activations, so forget parameters get no gradient;
  - ``default`` step: plain training.
  With ``--strategy none`` every step is a default step (plain training of the same model).

    python tools/reference_sgtm.py --batches FILE --json OUT --d-model 128 --n-layers 4 \\
        --n-heads 8 --d-ff 512 --vocab 4096 --seq-len 256 --forget-heads 1 --forget-units 64

Timing: ``--warmup`` steps, then ``--steps`` timed steps (``time.perf_counter`` around the whole
step: zero_grad, forward, loss, backward, masking, clipping, AdamW). Peak memory: ``getrusage``
``ru_maxrss`` of this process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_labels(batches: list[dict], n: int) -> list[str]:
    """Homogeneous step labels with the token shares of the batches' modes (0 unlabelled ->
    default, 1 retain, >=2 forget), spread evenly by a largest-remainder schedule."""
    import torch

    modes = torch.cat([b["modes"].reshape(-1) for b in batches])
    share = {"default": float((modes == 0).float().mean()), "retain": float((modes == 1).float().mean()),
             "forget": float((modes >= 2).float().mean())}
    given = dict.fromkeys(share, 0)
    out = []
    for i in range(n):
        # the label furthest behind its target count after i+1 steps
        label = max(share, key=lambda k: (share[k] * (i + 1) - given[k], share[k]))
        given[label] += 1
        out.append(label)
    return out


class ReferenceSGTM:
    def __init__(self, args):
        import torch
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        torch.manual_seed(args.seed)
        self.torch = torch
        config = GPTNeoConfig(
            vocab_size=args.vocab, max_position_embeddings=args.seq_len, hidden_size=args.d_model,
            num_layers=args.n_layers, attention_types=[[["global"], args.n_layers]], num_heads=args.n_heads,
            intermediate_size=args.d_ff, window_size=args.seq_len, activation_function="gelu",
            embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, tie_word_embeddings=True,
            use_cache=False)
        config._attn_implementation = "eager"
        self.model = GPTNeoForCausalLM(config)
        self.model.train()
        head_dim = args.d_model // args.n_heads
        self.retain_dim = (args.n_heads - args.forget_heads) * head_dim  # first columns/rows: retain
        self.retain_units = args.d_ff - args.forget_units
        self.strategy = args.strategy
        self.mode = "default"
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
        self.clip = args.grad_clip
        self.blocks = self.model.transformer.h
        if self.strategy == "sgtm":
            for block in self.blocks:
                block.attn.attention.out_proj.register_forward_pre_hook(self._retain_heads_off)
                block.mlp.act.register_forward_hook(self._retain_units_off)

    # retain-mode forward: forget heads/units switched off (hooks are no-ops on other steps)
    def _retain_heads_off(self, module, inputs):
        if self.mode != "retain" or self.retain_dim == module.in_features:
            return None
        (x,) = inputs
        x = x.clone()
        x[..., self.retain_dim:] = 0
        return (x,)

    def _retain_units_off(self, module, inputs, output):
        if self.mode != "retain" or self.retain_units == output.shape[-1]:
            return None
        output = output.clone()
        output[..., self.retain_units:] = 0
        return output

    def _mask_forget_step(self) -> None:
        """Forget step: only forget slices keep their gradient (param.grad edited in place)."""
        rd, ru = self.retain_dim, self.retain_units
        for block in self.blocks:
            attn, mlp = block.attn.attention, block.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                lin.weight.grad[:rd] = 0
            attn.out_proj.weight.grad[:, :rd] = 0
            attn.out_proj.bias.grad.zero_()
            mlp.c_fc.weight.grad[:ru] = 0
            mlp.c_fc.bias.grad[:ru] = 0
            mlp.c_proj.weight.grad[:, :ru] = 0
            mlp.c_proj.bias.grad.zero_()
            for ln in (block.ln_1, block.ln_2):
                ln.weight.grad.zero_()
                ln.bias.grad.zero_()
        t = self.model.transformer
        for p in (t.wte.weight, t.wpe.weight, t.ln_f.weight, t.ln_f.bias):
            p.grad.zero_()

    def step(self, batch: dict, label: str) -> float:
        torch = self.torch
        self.mode = label if self.strategy == "sgtm" else "default"
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=batch["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 batch["labels"].reshape(-1), ignore_index=-100)
        loss.backward()
        if self.mode == "forget":
            self._mask_forget_step()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return float(loss)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", required=True, help="torch.save'd list of batch dicts (input_ids, labels, modes)")
    p.add_argument("--json", help="where to write the measurement")
    p.add_argument("--strategy", choices=("sgtm", "none"), default="sgtm")
    p.add_argument("--d-model", type=int, required=True)
    p.add_argument("--n-layers", type=int, required=True)
    p.add_argument("--n-heads", type=int, required=True)
    p.add_argument("--d-ff", type=int, required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--forget-heads", type=int, default=1)
    p.add_argument("--forget-units", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.json:
        raise SystemExit("--json is required")
    import torch

    batches = torch.load(args.batches)
    ref = ReferenceSGTM(args)
    total = args.warmup + args.steps
    labels = step_labels(batches, total)
    setup_rss = current_rss_mib()
    times, losses = [], []
    for i in range(total):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        losses.append(ref.step(b, labels[i]))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    result = {
        "impl": "reference", "strategy": args.strategy, "step_times": times,
        "tokens_per_step": int(batches[0]["input_ids"].numel()),
        "params": sum(p.numel() for p in ref.model.parameters()),
        "setup_rss_mib": setup_rss, "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(), "losses": [losses[0], losses[-1]],
        "step_labels": {k: labels[args.warmup:].count(k) for k in ("default", "retain", "forget")},
    }
    with open(args.json, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
