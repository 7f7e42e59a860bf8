"""Tensor parallelism over torch.distributed (``LLM(..., tensor_parallel_size=N)``, ``--tensor-parallel-size N``).

- ``tp``: the sharding of the language model (a transform of the model built on the meta device, so each rank
  loads only its slices), its collectives, and the vision tower run on rank 0 only;
- ``worker``: rank 0 owns the scheduler and broadcasts each runner call; the other ranks mirror it;
- ``launch``: how the ranks start (spawned here, torchrun, several nodes) and rank 0's handle on them.

Nothing is imported here: ``qwen2vl.loader`` imports ``tp``, and ``launch`` imports the loader.
"""
