"""Engine: process groups, DeepSpeed construction and the training step."""
