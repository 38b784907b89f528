"""Shared fixtures: a one-process gloo world for in-process model tests. What the tests share
otherwise (tiny configs, batches, the multi-process launcher, ...) is in tests/support/;
``ROOT`` (the checkout) is re-exported here for the modules that read it from conftest."""

from __future__ import annotations

import os

import pytest

from pipeline.backend.distributed import free_port
from tests.support import ROOT

os.environ.setdefault("DS_ACCELERATOR", "cpu")
__all__ = ["ROOT", "single_process_world"]


@pytest.fixture
def single_process_world():
    """World of one process with megatron's parallel_state at TP=1 (in the pytest process).

    Joined once and then reused; joined again when an in-process ``sgtm train`` has left it."""
    import torch.distributed as dist

    from pipeline.backend.distributed import init_distributed
    from pipeline.config import EngineConfig

    if not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    return init_distributed(EngineConfig(tensor_parallel=1))
