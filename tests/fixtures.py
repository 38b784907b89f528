"""Small configs and hand-built mixed batches shared by in-process and multi-process tests."""

from __future__ import annotations

import torch

from pipeline.config import load_config
from pipeline.sgtm.codes import Mode

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
    """Every mode in one batch: sequences of two documents with different modes, and modes that
    change *inside* a document (forget spans after unlabelled or retain text, a retain span after
    a forget one, a change at the last position), with ``target_modes`` as the loader sends them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
    half = SEQ // 2
    doc_ids = torch.zeros(batch, SEQ, dtype=torch.long)
    doc_ids[:, half:] = 1
    last = Mode.FORGET + n_domains - 1
    U, R, F = Mode.UNLABELLED, Mode.RETAIN, Mode.FORGET
    q = SEQ // 4
    layouts = [  # per sequence: (mode, length) runs over the SEQ + 1 window
        [(U, half), (U, half + 1)], [(R, half), (F, half + 1)], [(F, half), (last, half + 1)],
        [(U, q), (F, q), (R, q), (U, q), (F, 1)],  # mixed inside both documents, forget target at the end
        [(R, q + 1), (F, 2 * q - 1), (R, 2 * q + 1)], [(U, 3), (last, 5), (U, 3), (F, SEQ + 1 - 11)],
    ]
    window = torch.zeros(batch, SEQ + 1, dtype=torch.long)
    for b in range(batch):
        pos = 0
        for mode, length in layouts[b % len(layouts)]:
            window[b, pos:pos + length] = mode
            pos += length
    labels = tokens[:, 1:].clone()
    labels[0, 3] = -100  # an unlabelled position must not count
    return {"input_ids": tokens[:, :-1], "labels": labels, "modes": window[:, :-1], "doc_ids": doc_ids,
            "target_modes": window[:, 1:]}


def isolation_batch(step: int, forget_seed: int, forget_mode: int) -> dict[str, torch.Tensor]:
    """Four one-document rows whose mode changes inside the document: retain-mode spans with fixed
    content and ``forget_mode`` spans whose content depends only on ``forget_seed`` (at the start, in the
    middle, at the end and as the last target; ``forget_mode`` unlabelled gives the control run)."""
    g_keep = torch.Generator().manual_seed(10_000 + step)
    g_forget = torch.Generator().manual_seed(forget_seed * 100_000 + step)
    keep = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g_keep)
    forget = torch.randint(0, VOCAB, (4, SEQ + 1), generator=g_forget)
    R, q = Mode.RETAIN, SEQ // 4
    layouts = [[(R, q), (forget_mode, q), (R, SEQ + 1 - 2 * q)], [(forget_mode, q), (R, SEQ + 1 - q)],
               [(R, SEQ), (forget_mode, 1)], [(R, 3), (forget_mode, 2), (R, 3), (forget_mode, SEQ + 1 - 8)]]
    window = torch.zeros(4, SEQ + 1, dtype=torch.long)
    is_forget = torch.zeros(4, SEQ + 1, dtype=torch.bool)  # the spans whose content varies
    for b, runs in enumerate(layouts):
        pos = 0
        for mode, length in runs:
            window[b, pos:pos + length] = mode
            is_forget[b, pos:pos + length] = mode == forget_mode
            pos += length
    tokens = torch.where(is_forget, forget, keep)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "modes": window[:, :-1],
            "target_modes": window[:, 1:], "doc_ids": torch.zeros(4, SEQ, dtype=torch.long)}
