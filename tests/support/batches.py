"""Hand-built batches: every mode in one batch (:func:`mixed_batch`), ``sgtm check-isolation``'s
layouts (:func:`isolation_batch`), a global batch with every position labelled and its
data-parallel shares (:func:`global_batch`, :func:`dp_share`). Sizes: :mod:`tests.support.configs`."""

from __future__ import annotations

import torch

from pipeline.codes import Mode
from tests.support.configs import SEQ, VOCAB


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


def isolation_batch(step: int, forget_seed: int, forget_mode: int, n_domains: int = 1) -> dict[str, torch.Tensor]:
    """Four rows of ``sgtm check-isolation``'s layouts (:func:`pipeline.commands.isolation.isolation_batch`,
    the one generator): 2-4 documents a row, forget runs at the start, in the middle, short and as
    the last target, ignored labels; two forget seeds differ only at forget positions (content,
    domain, document cuts, which labels are ignored, so the forget count). Unlabelled runs in the
    first step only: over several steps an unlabelled position reads forget parameters that
    learnt from forget data (docs/architecture.md, "The invariant"). ``forget_mode`` unlabelled
    gives the control run."""
    from pipeline.commands.isolation import isolation_batch as layouts

    return layouts(step, forget_seed, forget_mode, 4, SEQ, VOCAB, n_domains=n_domains, unlabelled=step == 0)


def global_batch(step: int, n_domains: int = 2) -> dict[str, torch.Tensor]:
    """:func:`mixed_batch` of 4 rows (seed ``step``) with every position labelled: equal DP shares."""
    b = mixed_batch(seed=step, batch=4, n_domains=n_domains)
    b["labels"] = b["input_ids"].roll(-1, dims=1)
    return b


def dp_share(batch: dict, dp_rank: int, dp_size: int, gas: int = 1) -> list[dict]:
    """This DP rank's ``gas`` micro-batches of a global batch of 4 rows."""
    n = 4 // dp_size
    mine = {k: v[dp_rank * n:(dp_rank + 1) * n] for k, v in batch.items()}
    m = n // gas
    return [{k: v[i * m:(i + 1) * m] for k, v in mine.items()} for i in range(gas)]
