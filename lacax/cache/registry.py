"""Cache policies by name, built from one budget so that comparisons are at equal cache size.

`make_policy(name, cache_config)` reads the fields of a config's `cache` section:

  size         the KV budget in tokens per layer (every policy holds at most about this many);
  start_size   attention sinks for StreamingLLM and LaCache (4 in both references);
  span, overlap, layer_mapping   the LaCache ladder;
  score_agg    GQA reduction for score-based policies ("mean", "max", "sum");
  window       SnapKV / PyramidKV observation window;
  and, for KVMerger, `merge_threshold`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from lacax.cache.policies import LadderPolicy, StreamingPolicy
from lacax.cache.policy import CachePolicy, FullPolicy


def _get(cache: Mapping[str, Any] | Any, key: str, default=None):
  if isinstance(cache, Mapping):
    return cache.get(key, default)
  return getattr(cache, key, default)


def _full(cache) -> CachePolicy:
  del cache
  return FullPolicy()


def _streaming(cache) -> CachePolicy:
  start = _get(cache, "start_size", 4)
  return StreamingPolicy(start_size=start, recent_size=_get(cache, "size") - start)


def _lacache(cache) -> CachePolicy:
  return LadderPolicy(span=_get(cache, "span", 16), overlap=_get(cache, "overlap", 0), cache_size=_get(cache, "size"),
                      start_size=_get(cache, "start_size", 4), layer_mapping=_get(cache, "layer_mapping", "modular"))


def _h2o(cache) -> CachePolicy:
  from lacax.cache.scored import H2OPolicy  # pylint: disable=g-import-not-at-top

  size = _get(cache, "size")
  return H2OPolicy(heavy=size // 2, recent=size - size // 2, score_agg=_get(cache, "score_agg", "mean"))


def _tova(cache) -> CachePolicy:
  from lacax.cache.scored import TOVAPolicy  # pylint: disable=g-import-not-at-top

  return TOVAPolicy(budget=_get(cache, "size"))


POLICIES: dict[str, Callable[[Any], CachePolicy]] = {
    "full": _full,
    "streaming": _streaming,
    "lacache": _lacache,
    "h2o": _h2o,
    "tova": _tova,
}


def make_policy(name: str, cache: Mapping[str, Any] | Any) -> CachePolicy:
  """The policy `name` at the budget `cache.size`.

  Raises:
    ValueError: an unknown name, or a budget the policy cannot run (the message names the field).
  """
  if name not in POLICIES:
    raise ValueError(f"cache policy {name!r} is unknown; expected one of {sorted(POLICIES)}")
  size = _get(cache, "size")
  if name != "full" and (not isinstance(size, int) or size <= 0):
    raise ValueError(f"cache.size={size!r} must be a positive number of tokens for policy {name!r}")
  return POLICIES[name](cache)
