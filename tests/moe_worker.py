"""Multi-process MoE scenarios (expert parallelism), run like tests/dist_worker.py's (whose ``main``
and fixtures they reuse): ``python tests/moe_worker.py SCENARIO JSON`` on N local gloo ranks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline.codes import Mode  # noqa: E402
from pipeline.engine.distributed import init_distributed  # noqa: E402
from pipeline.engine.engine import build_engine, build_model, train_step  # noqa: E402
from pipeline.model import moe  # noqa: E402
from pipeline.model.ablate import ablate  # noqa: E402
from tests import dist_worker  # noqa: E402
from tests.fixtures import isolation_batch, mixed_batch  # noqa: E402
from tests.moe_cases import moe_config, mutation  # noqa: E402


def scenario_moe_grads(out: Path, cases: dict[str, dict]) -> dict:
    """Per case (moe_config overrides, EP and TP from it): loss and TP=1/EP=1 gradients of a mixed
    batch; then ablation on every shard (local check), the ablated state and its loss."""
    result = {}
    for name, over in cases.items():
        cfg = moe_config(**over)
        d = init_distributed(cfg.engine)
        part, model = build_model(cfg, d)
        batch = mixed_batch(n_domains=len(cfg.sgtm.domains))
        kw = dict(labels=batch["labels"], modes=batch["modes"], doc_ids=batch["doc_ids"],
                  target_modes=batch["target_modes"])
        loss = model(batch["input_ids"], **kw)
        loss.backward()
        state, grads = moe.gather_full_state_dict(model), moe.gather_full_state_dict(model, grads=True)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ablate(model, [0])
        local_ok, zeroed = True, 0
        for n, p in model.named_parameters():
            sel = p.sgtm_role.slice_mask(p, {0}).expand_as(p)
            zeroed += int(sel.sum())
            local_ok &= bool((p[sel] == 0).all()) and torch.equal(p[~sel], before[n][~sel])
        model.eval()
        with torch.no_grad():
            ablated_loss = model(batch["input_ids"], **kw)
        ablated = moe.gather_full_state_dict(model)
        flags = [None] * d.world_size
        dist.all_gather_object(flags, {"ok": local_ok, "zeroed": zeroed, "ep": moe.ep_world(),
                                       "experts": [int(p.expert_index) for p in model.parameters()
                                                   if getattr(p, "expert_parallel", False)]})
        if d.rank == 0:
            torch.save({"state": state, "grads": grads, "loss": loss.detach(), "ablated": ablated,
                        "ablated_loss": ablated_loss}, out / f"moe_{name}.pt")
        result[name] = {"ranks": flags, "dp": [d.dp_rank, d.dp_size]}
    return result


def scenario_moe_isolation(out: Path, runs: list[dict], steps: int) -> dict:
    """Per run: three DeepSpeed runs at EP=2 that differ only in forget spans (A, B: other content;
    C: B's content unlabelled); the finals (TP=1/EP=1 view) are saved. Also whether the
    replicated parameters stayed bit-identical on the two EP ranks."""
    result = {}
    for run in runs:
        finals, replicas_equal = {}, True
        with mutation(run.get("mutation")):
            for name, seed, mode in (("A", 1, Mode.FORGET), ("B", 2, Mode.FORGET), ("C", 2, Mode.UNLABELLED)):
                cfg = moe_config(ep=2, engine={"zero_stage": run.get("zero", 1), "micro_batch_size": 4,
                                               **run.get("engine", {})},
                                 optimizer={"lr": 3e-3, "weight_decay": 0.1}, train={"steps": steps},
                                 **run.get("config", {}))
                state = build_engine(cfg)
                for step in range(steps):
                    train_step(state, [isolation_batch(step, seed, mode)])
                finals[name] = moe.gather_full_state_dict(state.model)
                for _n, p in state.model.named_parameters():
                    if getattr(p, "expert_parallel", False):
                        continue
                    parts = [torch.empty_like(p.detach()) for _ in range(dist.get_world_size())]
                    dist.all_gather(parts, p.detach().contiguous())
                    replicas_equal &= all(torch.equal(parts[0], t) for t in parts)
                if state.clipper is not None and state.clipper.last_norms is not None:
                    finals[name + "_norms"] = state.clipper.last_norms.clone()
        if dist.get_rank() == 0:
            torch.save({"finals": finals}, out / f"moe_isolation_{run['name']}.pt")
        result[run["name"]] = {"replicas_equal": replicas_equal}
    return result


if __name__ == "__main__":
    dist_worker.main({**vars(dist_worker), **globals()})
