"""The transformer (one file) and its tensor-parallel state helpers."""

from pipeline.model.transformer import Transformer

__all__ = ["Transformer"]
