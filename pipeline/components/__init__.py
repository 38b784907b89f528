"""Training components composed by the one train loop: checkpoint, metrics, evaluation, clipping."""
