"""What the tests share, one module per concept (no test module imports another test module):

* ``configs``: tiny configs (``tiny_config`` and its named variants: GQA, MQA, MoE, PP/TP/DP
  layouts) and the tiny ``sgtm train`` overrides on the bundled bilingual data;
* ``batches``: hand-built mixed-mode batches, ``check-isolation``'s layouts, DP shares;
* ``data``: small corpora written to disk (shards, BPE) in seconds;
* ``isolation``: the random isolation cases (one generator for hypothesis and seeded ranks) and
  the slice comparisons;
* ``mutations``: the deliberate breakages that show a check can fail;
* ``compare``: equivalence of tensors computed under two layouts;
* ``reference_model``: an independent plain-torch model;
* ``sweeps``: synthetic sweep directories for the analyses;
* ``launch``: the one multi-process launcher (``run_scenario`` runs a scenario function of a test
  module on N local gloo ranks through ``pipeline.backend.distributed.spawn_local_ranks``;
  ``start_ranks`` starts ``sgtm train`` ranks a test then kills or signals); ``worker``: its
  generic entry point.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
