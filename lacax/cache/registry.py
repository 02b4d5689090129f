"""Cache policies by name, built from one budget so that comparisons are at equal cache size.

`make_policy(name, cache_config)` reads the fields of a config's `cache` section:

  size         the KV budget in tokens per layer (every policy holds at most about this many);
  start_size   attention sinks for StreamingLLM and LaCache (4 in both references);
  span, overlap, layer_mapping   the LaCache ladder;
  score_agg    GQA reduction for score-based policies ("mean", "max", "sum");
  window       SnapKV / PyramidKV observation window;
  merge_threshold, exact_budget   KVMerger's cosine threshold (0.75) and whether it merges down to exactly
               `size` slots (default True, so that it is compared at the same budget as the others; with False
               it merges by threshold only, the paper's mode, and `size` is an upper bound on merging).

`make_prefill_policy(name, cache_config, cfg, prompt_len=..., protocol=...)` is the one-shot set-up (prefill a
long prompt, compact once, then decode compacting every step) of the LaCache reference drivers, where the
budget is the fraction `cache.budget` of the prompt (NIAH / passkey) or of the model's maximum length
(LongBench).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from lacax.cache.ladder import PREFILL_PROTOCOLS
from lacax.cache.policies import LadderPolicy, StreamingPolicy
from lacax.cache.policy import CachePolicy, FullPolicy
from lacax.model.config import ModelConfig


def _get(cache: Mapping[str, Any] | Any, key: str, default=None):
  if isinstance(cache, Mapping):
    return cache.get(key, default)
  return getattr(cache, key, default)


def _full(cache) -> CachePolicy:
  return FullPolicy(rope_mode=_get(cache, "rope_mode", "slot"))


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


def _snapkv(cache) -> CachePolicy:
  from lacax.cache.scored import SnapKVPolicy  # pylint: disable=g-import-not-at-top

  return SnapKVPolicy(capacity=_get(cache, "size"), window=_get(cache, "window", 32),
                      score_agg=_get(cache, "score_agg", "mean"))


def _pyramidkv(cache) -> CachePolicy:
  from lacax.cache.scored import PyramidKVPolicy  # pylint: disable=g-import-not-at-top

  return PyramidKVPolicy(capacity=_get(cache, "size"), window=_get(cache, "window", 32),
                         score_agg=_get(cache, "score_agg", "mean"))


def _kvmerger(cache) -> CachePolicy:
  from lacax.cache.kvmerger import KVMergerPolicy  # pylint: disable=g-import-not-at-top

  return KVMergerPolicy(eps=_get(cache, "merge_threshold", 0.75), budget=_get(cache, "size"),
                        exact_budget=bool(_get(cache, "exact_budget", True)),
                        score_agg=_get(cache, "score_agg", "mean"))


POLICIES: dict[str, Callable[[Any], CachePolicy]] = {
    "full": _full,
    "streaming": _streaming,
    "lacache": _lacache,
    "h2o": _h2o,
    "tova": _tova,
    "snapkv": _snapkv,
    "pyramidkv": _pyramidkv,
    "kvmerger": _kvmerger,
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


def _as_dict(cache: Mapping[str, Any] | Any) -> dict[str, Any]:
  if isinstance(cache, Mapping):
    return dict(cache)
  if hasattr(cache, "to_dict"):  # ml_collections.ConfigDict
    return cache.to_dict()
  return dict(vars(cache))


def prefill_budget(cache: Mapping[str, Any] | Any, *, prompt_len: int, protocol: str = "niah",
                   model_max_len: int | None = None) -> int:
  """The token budget of the one-shot protocol: int(cache.budget * prompt_len) ("niah") or
  int(cache.budget * model_max_len) ("longbench", the reference's `LongBench/pred.py`)."""
  budget = _get(cache, "budget")
  if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
    raise ValueError(f"cache.budget={budget!r} must be a positive fraction (0.5 = half of the "
                     f"{'prompt' if protocol == 'niah' else 'model max length'})")
  if protocol == "niah":
    basis = prompt_len
  elif protocol == "longbench":
    if not isinstance(model_max_len, int) or model_max_len <= 0:
      raise ValueError(f"model_max_len={model_max_len!r} must be a positive int for protocol 'longbench'")
    basis = model_max_len
  else:
    raise ValueError(f"protocol={protocol!r} must be one of {list(PREFILL_PROTOCOLS)}")
  return max(1, int(budget * basis))


def make_prefill_policy(name: str, cache: Mapping[str, Any] | Any, cfg: ModelConfig, *, prompt_len: int,
                        protocol: str = "niah", model_max_len: int | None = None) -> CachePolicy:
  """The policy `name` for the one-shot protocol: prefill the prompt, compact once, decode compacting.

  Every policy gets the same token budget C = `prefill_budget(...)`:

    full       keeps everything;
    lacache    `LadderPolicy.for_prefill` (cache_size C; sinks 64 for "niah" as `niah/pred.py`, and
               min(128, P - N - 1, C - N - 1) for "longbench" as `LongBench/pred.py`);
    any other  `make_policy(name, cache with size=C)` (StreamingLLM keeps `cache.start_size` sinks + C - start
               recent tokens, H2O C/2 heavy + C/2 recent, SnapKV / PyramidKV a C-token prompt, KVMerger
               merges to C slots).

  A prompt no longer than C is not compressed by any policy.

  Raises:
    ValueError: an unknown name or protocol, or a budget the policy cannot run (the message names the field).
  """
  if name not in POLICIES:
    raise ValueError(f"cache policy {name!r} is unknown; expected one of {sorted(POLICIES)}")
  size = prefill_budget(cache, prompt_len=prompt_len, protocol=protocol, model_max_len=model_max_len)
  if name == "full":
    return _full(cache)
  if name == "lacache":
    return LadderPolicy.for_prefill(cfg, span=_get(cache, "span", 16), overlap=_get(cache, "overlap", 0),
                                    budget=_get(cache, "budget"), prompt_len=prompt_len,
                                    model_max_len=model_max_len, protocol=protocol,
                                    layer_mapping=_get(cache, "layer_mapping", "modular"))
  return make_policy(name, {**_as_dict(cache), "size": size})
