"""Deterministic fault injection for the reliability tests (``tests/test_reliability.py``).

``SGTM_FAULT`` holds comma-separated ``name@step`` items (``name`` alone fires at every step);
the variable is read per process, so a test arms one rank by setting it in that rank's
environment only. Unset (production), every hook is one dictionary lookup.

Hooks (where they fire):

* ``kill_in_step@N``   train step N, after the forward of its first micro-batch: SIGKILL self
* ``kill_in_save@N``   checkpoint of step N, after DeepSpeed wrote its files, before COMPLETE
* ``enospc_in_save@N`` checkpoint of step N: the first write raises OSError(ENOSPC)
* ``sigterm_at@N``     after train step N: SIGTERM self (what SLURM preemption delivers)
* ``nan_loss@N``       train step N: the loss of the last micro-batch becomes NaN
* ``nan_grad@N``       train step N: finite loss, NaN gradients
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "SGTM_FAULT"


def _parse(spec: str) -> dict[str, set[int] | None]:
    out: dict[str, set[int] | None] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, step = item.partition("@")
        if not step:
            out[name] = None
        elif out.get(name, set()) is not None:
            out.setdefault(name, set()).add(int(step))
    return out


def armed(name: str, step: int | None = None) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    faults = _parse(spec)
    if name not in faults:
        return False
    steps = faults[name]
    return steps is None or (step is not None and step in steps)


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


def enospc(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
