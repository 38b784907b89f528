"""The bottom of the runtime: process groups (rank discovery, megatron's TP/PP/DP/EP groups, the
``mpu`` DeepSpeed expects) and the one module that touches DeepSpeed's private API. Imports
nothing from the model, the components or the engine."""
