"""SnapKV (arXiv 2404.14469): compress the prompt by the attention of its last `window` queries.

Reference FasterDecoding/SnapKV; the scoring, pooling and top-k prefix selection shared with PyramidKV are
`lacax.cache.base.WindowScoredPolicy`, the conventions of the score-based policies `lacax.cache.plans`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lacax.cache.base import WindowScoredPolicy


@dataclasses.dataclass(frozen=True)
class SnapKVPolicy(WindowScoredPolicy):
  """SnapKV: compress the prompt to `capacity` tokens chosen by the attention of its last `window` queries.

  Reference FasterDecoding/SnapKV `snapkv/monkeypatch/snapkv_utils.py::SnapKVCluster.update_kv` (prefill only):
  if the prompt has P >= capacity tokens, the window queries' attention to the prefix [0, P - window) is summed
  over the window, pooled (`avg_pool1d` / `max_pool1d`, `kernel`, padding kernel // 2, stride 1) and the top
  (capacity - window) prefix tokens are kept with the whole window; a shorter prompt is left alone (P ==
  capacity keeps everything, so it is a no-op as well). Decoding appends without further eviction.

  lacax scores per KV head (group reduced with `score_agg`, as kvpress and KVCache-Factory's kv_head mode; the
  SnapKV repository works on query heads) and per row. Ties go to the older token.

  Attributes:
    capacity: prompt tokens kept (window included); > window.
    window: observation window w (32 in SnapKV's `init_snapkv`, 64 in the class default).
    kernel: odd pooling width (SnapKV's default is 5; 7 is KVCache-Factory's).
    pooling: "avg" (SnapKV's default) or "max".
    score_agg: GQA group reduction: "mean", "max" or "sum".
    rope_mode: "original" (default, as the reference's post-RoPE cache), "slot" or "stored".
    max_new_tokens: decode tokens the cache must leave room for (see `slots`); None sizes the decode cache
      for the whole run. Set it to at least the run's max_new_tokens: the forward drops (silently, being
      jitted) the keys of tokens written past the last slot. `lacax.generate` sizes the decode cache with
      `run_capacity` (kept prompt + generated tokens) whatever this is.
    lean_decode: the decode cache records no scores and stores keys rotated (see `WindowScoredPolicy`);
      False keeps the recording cache through decode (slower; the behaviour before).
  """

  capacity: int
  window: int = 32
  kernel: int = 7
  pooling: str = "avg"
  score_agg: str = "mean"
  rope_mode: str = "original"
  max_new_tokens: int | None = None
  lean_decode: bool = True

  def __post_init__(self):
    self._validate("SnapKV")

  def max_kept(self) -> int:
    return self.capacity

  def prefix_budget(self, num_layers: int, prompt_len: jax.Array) -> jax.Array:
    del prompt_len
    return jnp.full((num_layers,), self.capacity - self.window, jnp.int32)
