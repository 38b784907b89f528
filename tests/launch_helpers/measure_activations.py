"""Bytes autograd saves for one forward of tiny models, next to tools/memory_estimate.py's count.

    python tests/launch_helpers/measure_activations.py   -> JSON lines {arch, dtype, b, s, measured, estimate}

Run in its own process: it joins a one-process gloo world on loopback."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    _port = _s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port),
                  DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo")

import memory_estimate  # noqa: E402
import torch  # noqa: E402

from pipeline.backend.distributed import init_distributed  # noqa: E402
from pipeline.config import EngineConfig, load_config  # noqa: E402
from pipeline.engine.engine import build_model  # noqa: E402


def saved_bytes(model: torch.nn.Module, b: int, s: int, vocab: int) -> int:
    """Unique storages packed for backward, minus parameters and buffers (not activations)."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t is not None}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    modes = torch.randint(0, 3, (b, s), generator=g)
    docs = torch.cumsum((torch.rand(b, s, generator=g) < 0.05).long(), 1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, modes=modes, doc_ids=docs)
    return sum(seen.values())


def main() -> None:
    dist = init_distributed(EngineConfig(tensor_parallel=1))
    for arch, fragment in (("gpt-neo", "models/tiny-1m.yaml"), ("llama", "models/tiny-llama-1m.yaml")):
        for dtype in (torch.float32, torch.bfloat16):
            for b, s in ((2, 64), (4, 128)):
                cfg = load_config(data={"model": {"base": fragment, "max_seq_len": s},
                                        "sgtm": {"domains": [{"name": "f", "heads": 1, "units": 64}]}})
                _, model = build_model(cfg, dist)
                model.to(dtype)
                measured = saved_bytes(model, b, s, cfg.model.vocab_size)
                est = memory_estimate.activation_bytes(cfg.model, 1, b, s, dtype.itemsize)
                print(json.dumps({"arch": arch, "dtype": str(dtype), "b": b, "s": s, "measured": measured,
                                  "estimate": est}), flush=True)


if __name__ == "__main__":
    main()
