"""Small configs and hand-built mixed batches shared by in-process and multi-process tests."""

from __future__ import annotations

import torch

from pipeline.config import load_config
from pipeline.sgtm.modes import FORGET, RETAIN, UNLABELLED

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


def mixed_batch(seed: int = 0, batch: int = 6, n_domains: int = 2) -> dict[str, torch.Tensor]:
    """Every mode in one batch: whole sequences of each mode, and sequences whose two documents
    have different modes (document masking keeps them independent)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
    half = SEQ // 2
    doc_ids = torch.zeros(batch, SEQ, dtype=torch.long)
    doc_ids[:, half:] = 1
    last = FORGET + n_domains - 1
    per_seq = [(UNLABELLED, UNLABELLED), (RETAIN, RETAIN), (FORGET, FORGET), (last, last),
               (RETAIN, FORGET), (UNLABELLED, last)]
    modes = torch.zeros(batch, SEQ, dtype=torch.long)
    for b in range(batch):
        first, second = per_seq[b % len(per_seq)]
        modes[b, :half], modes[b, half:] = first, second
    labels = tokens[:, 1:].clone()
    labels[0, 3] = -100  # an unlabelled position must not count
    return {"input_ids": tokens[:, :-1], "labels": labels, "modes": modes, "doc_ids": doc_ids}


def isolation_batch(step: int, forget_seed: int, forget_mode: int) -> dict[str, torch.Tensor]:
    """Two retain-mode sequences (fixed content) and two sequences of ``forget_mode`` whose
    content depends only on ``forget_seed``."""
    g_keep = torch.Generator().manual_seed(10_000 + step)
    g_forget = torch.Generator().manual_seed(forget_seed * 100_000 + step)
    keep = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g_keep)
    forget = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g_forget)
    tokens = torch.cat([keep, forget])
    modes = torch.tensor([RETAIN, RETAIN, forget_mode, forget_mode]).repeat_interleave(SEQ).view(4, SEQ)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "modes": modes,
            "doc_ids": torch.zeros(4, SEQ, dtype=torch.long)}
