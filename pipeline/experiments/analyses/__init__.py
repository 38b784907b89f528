"""The analyses of `sgtm analyze`, one module each: every module reads sweep cells (or runs),
writes ``<name>.analysis.json`` + ``<name>.png`` and registers itself in :mod:`.registry`, from
which the CLI and `sgtm report` are built. Shared pieces: :mod:`.claims` (claim rows, verdicts,
interval columns) and :mod:`.plots` (matplotlib helpers)."""
