"""Pallas kernels for KV-cache transformations, each with a jax.numpy reference of identical semantics.

  gather / reference_gather / pallas_gather:
      compaction by a slot plan (eviction policies: LaCache ladder, StreamingLLM, H2O, SnapKV, ...).
  segment_merge / reference_segment_merge / pallas_segment_merge:
      weighted merge of runs of consecutive slots (KVMerger-style).

The dispatchers (`gather`, `segment_merge`) take `impl="auto"`: the Pallas kernel on TPU and GPU, the
reference on CPU. Every kernel has a TPU (Mosaic) and a GPU (Triton) formulation, both tested on CPU in
interpret mode; see the module docstrings for what was and was not verified on hardware.
"""

from pallas_kernels.compaction import gather
from pallas_kernels.compaction import pallas_gather
from pallas_kernels.compaction import reference_gather
from pallas_kernels.merge import pallas_segment_merge
from pallas_kernels.merge import reference_segment_merge
from pallas_kernels.merge import segment_merge

__all__ = [
    "gather",
    "pallas_gather",
    "reference_gather",
    "pallas_segment_merge",
    "reference_segment_merge",
    "segment_merge",
]
