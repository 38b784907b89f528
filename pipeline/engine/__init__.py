"""Engine: the DeepSpeed engine built from a config (``engine``), and the trainer of each parallel
layout behind one interface (``trainer``: ``flat`` and ``pipe``)."""
