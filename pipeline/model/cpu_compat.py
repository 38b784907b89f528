"""megatron-core's sequence-parallel mappings on a machine without CUDA.

``gather_from_sequence_parallel_region``, ``reduce_scatter_to_sequence_parallel_region`` and
``scatter_to_sequence_parallel_region`` (its backward) allocate their output with
``device=torch.cuda.current_device()``, which raises on a CPU-only torch. The autograd functions
look the two helpers up in their module at call time, so replacing them there with versions
that allocate on the input's device is enough; the collectives are the same
(``all_gather_into_tensor`` / ``reduce_scatter_tensor``, which gloo runs on CPU tensors).
Applied only when CUDA is absent (:func:`patch_sequence_parallel_mappings`), so GPU runs use
megatron's code untouched.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_PATCHED = False


def patch_sequence_parallel_mappings() -> bool:
    """Idempotent; returns whether the CPU versions are in place."""
    global _PATCHED
    if _PATCHED or torch.cuda.is_available():
        return _PATCHED
    from megatron.core.tensor_parallel import mappings

    orig_gather, orig_rs = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is not None or use_global_buffer or group.size() == 1:
            return orig_gather(input_, group, output_split_sizes, use_global_buffer)
        out = torch.empty((input_.shape[0] * group.size(), *input_.shape[1:]), dtype=input_.dtype,
                          device=input_.device)
        dist.all_gather_into_tensor(out, input_.contiguous(), group=group)
        return out

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is not None or use_global_buffer or group.size() == 1:
            return orig_rs(input_, group, input_split_sizes, use_global_buffer)
        world = group.size()
        if input_.shape[0] % world:
            raise ValueError(f"reduce-scatter: first dimension {input_.shape[0]} is not divisible by {world} ranks")
        out = torch.empty((input_.shape[0] // world, *input_.shape[1:]), dtype=input_.dtype, device=input_.device)
        dist.reduce_scatter_tensor(out, input_.contiguous(), group=group)
        return out

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim
    _PATCHED = True
    return True
