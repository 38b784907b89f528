"""Experiments: sweeps, the paper's analyses (leakage, compute penalty, fine-tuning attack, RMU,
mechanism), and the Markdown report that gathers them. Every analysis writes
``<name>.analysis.json`` (machine-readable, with the command that produced it) and a PNG."""
