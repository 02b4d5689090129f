"""Cache policies by name, built from one budget so that comparisons are at equal cache size.

Every registered policy is a `PolicySpec`: its class, which fields of a config's `cache` section it reads
(`fields`: config field -> policy field), and how the shared budget `cache.size` becomes its own sizes
(`sized`). A config field left out takes the policy dataclass's own default, so each default lives once, on
the dataclass; `cache_defaults()` derives a config's `cache` section from them (configs/lacache.py).

  size         the KV budget in tokens per layer (every policy holds at most about this many);
  start_size   attention sinks for StreamingLLM and LaCache (4 in both references);
  span, overlap, layer_mapping   the LaCache ladder;
  score_agg    GQA reduction for score-based policies ("mean", "max", "sum");
  window, kernel, pooling, beta  SnapKV / PyramidKV observation window, pooling and pyramid steepness;
  merge_threshold, exact_budget   KVMerger's cosine threshold (0.75) and whether it merges down to exactly
               `size` slots (True in the registry, so that it is compared at the same budget as the others;
               with False it merges by threshold only, the paper's mode, and `size` is an upper bound);
  rope_mode    the full cache's key storage ("slot" or "stored");
  kv_bits      8 stores any policy's cache as int8 with per-token scales (`lacax.cache.int8`); unset = float.

`make_prefill_policy(name, cache_config, cfg, prompt_len=..., protocol=...)` is the one-shot set-up (prefill a
long prompt, compact once, then decode compacting every step) of the LaCache reference drivers, where the
budget is the fraction `cache.budget` of the prompt (NIAH / passkey) or of the model's maximum length
(LongBench).

Adding a method: its module under `lacax/cache/` and one `PolicySpec` in `POLICIES`; the contract test
(`tests/test_cache_contract.py`) and the sharding tests then cover it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from lacax.cache.base import CachePolicy
from lacax.cache.full import FullPolicy
from lacax.cache.h2o import H2OPolicy
from lacax.cache.int8 import with_kv_bits
from lacax.cache.kvmerger import KVMergerPolicy
from lacax.cache.ladder import PREFILL_PROTOCOLS, LadderPolicy
from lacax.cache.pyramidkv import PyramidKVPolicy
from lacax.cache.snapkv import SnapKVPolicy
from lacax.cache.streaming import StreamingPolicy
from lacax.cache.tova import TOVAPolicy
from lacax.model.config import ModelConfig

_NO_DEFAULT = object()


def _get(cache: Mapping[str, Any] | Any, key: str, default=None):
  if isinstance(cache, Mapping):
    return cache.get(key, default)
  return getattr(cache, key, default)


@dataclasses.dataclass(frozen=True)
class PolicySpec:
  """How the registry builds one policy from a config's `cache` section.

  Attributes:
    cls: the policy class (a frozen dataclass).
    fields: config field -> policy field, for the fields the config may set; an absent config field takes the
      dataclass default.
    sized: (budget in tokens, read) -> the policy fields the shared budget fixes; `read(field)` gives the
      policy's value of another field (the config's, else the dataclass default). None: the policy has no
      budget (the full cache).
    overrides: policy field -> the registry's default where it deliberately differs from the dataclass's
      (documented in the module docstring).
    prefill: optional (cache config, model config, read, budget, prompt_len, protocol, model_max_len) ->
      policy, for a policy whose one-shot set-up is not just "the budget as `size`" (LaCache).
  """

  cls: type[CachePolicy]
  fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
  sized: Callable[[int, Callable[[str], Any]], dict[str, Any]] | None = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  prefill: Callable[..., CachePolicy] | None = None

  def field_default(self, policy_field: str):
    """The registry's default for `policy_field`: an override, else the dataclass default."""
    if policy_field in self.overrides:
      return self.overrides[policy_field]
    for f in dataclasses.fields(self.cls):
      if f.name == policy_field:
        if f.default is not dataclasses.MISSING:
          return f.default
        if f.default_factory is not dataclasses.MISSING:
          return f.default_factory()
        return _NO_DEFAULT
    raise KeyError(f"{self.cls.__name__} has no field {policy_field!r}")

  def reader(self, cache: Mapping[str, Any] | Any) -> Callable[[str], Any]:
    """read(policy_field): the config's value (through `fields`) or the registry default."""
    by_policy_field = {p: c for c, p in self.fields.items()}

    def read(policy_field: str):
      config_field = by_policy_field.get(policy_field)
      value = _get(cache, config_field, _NO_DEFAULT) if config_field else _NO_DEFAULT
      return self.field_default(policy_field) if value is _NO_DEFAULT else value

    return read

  def build(self, cache: Mapping[str, Any] | Any, size: int | None) -> CachePolicy:
    """The policy with the config's fields, the registry defaults for the rest, sized to `size`."""
    read = self.reader(cache)
    kwargs = {p: read(p) for p in self.fields.values()}
    kwargs.update({p: v for p, v in self.overrides.items() if p not in kwargs})
    if self.sized is not None:
      kwargs.update(self.sized(size, read))
    return self.cls(**{k: v for k, v in kwargs.items() if v is not _NO_DEFAULT})


def _ladder_prefill(cache, cfg: ModelConfig, read, *, prompt_len: int, protocol: str,
                    model_max_len: int | None) -> CachePolicy:
  return LadderPolicy.for_prefill(cfg, span=read("span"), overlap=read("overlap"), budget=_get(cache, "budget"),
                                  prompt_len=prompt_len, model_max_len=model_max_len, protocol=protocol,
                                  layer_mapping=read("layer_mapping"))


_SCORED = {"score_agg": "score_agg"}
_WINDOW = {"window": "window", "kernel": "kernel", "pooling": "pooling", **_SCORED}

POLICIES: dict[str, PolicySpec] = {
    "full": PolicySpec(FullPolicy, fields={"rope_mode": "rope_mode"}),
    "streaming": PolicySpec(StreamingPolicy, fields={"start_size": "start_size"},
                            sized=lambda size, read: {"recent_size": size - read("start_size")}),
    "lacache": PolicySpec(LadderPolicy, fields={"span": "span", "overlap": "overlap", "start_size": "start_size",
                                                "layer_mapping": "layer_mapping"},
                          sized=lambda size, read: {"cache_size": size}, prefill=_ladder_prefill),
    "h2o": PolicySpec(H2OPolicy, fields=_SCORED,
                      sized=lambda size, read: {"heavy": size // 2, "recent": size - size // 2}),
    "tova": PolicySpec(TOVAPolicy, fields=_SCORED, sized=lambda size, read: {"budget": size}),
    "snapkv": PolicySpec(SnapKVPolicy, fields=_WINDOW, sized=lambda size, read: {"capacity": size}),
    "pyramidkv": PolicySpec(PyramidKVPolicy, fields={**_WINDOW, "beta": "beta"},
                            sized=lambda size, read: {"capacity": size}),
    "kvmerger": PolicySpec(KVMergerPolicy, fields={"merge_threshold": "eps", "exact_budget": "exact_budget",
                                                   **_SCORED},
                           sized=lambda size, read: {"budget": size}, overrides={"exact_budget": True}),
}


def policy_names() -> tuple[str, ...]:
  """Every registered policy name, in registration order."""
  return tuple(POLICIES)


def _spec(name: str) -> PolicySpec:
  if name not in POLICIES:
    raise ValueError(f"cache policy {name!r} is unknown; expected one of {sorted(POLICIES)}")
  return POLICIES[name]


def cache_defaults(names=None) -> dict[str, Any]:
  """The config fields the policies `names` (default: all) read, with the registry defaults.

  Raises:
    ValueError: two policies share a config field but disagree on its default.
  """
  out, owner = {}, {}
  for name in names or POLICIES:
    spec = _spec(name)
    for config_field, policy_field in spec.fields.items():
      default = spec.field_default(policy_field)
      if default is _NO_DEFAULT:
        continue
      if config_field in out and out[config_field] != default:
        raise ValueError(f"cache.{config_field} defaults to {out[config_field]!r} for {owner[config_field]!r} "
                         f"but {default!r} for {name!r}; give the field one default")
      out[config_field], owner[config_field] = default, name
  return out


def make_policy(name: str, cache: Mapping[str, Any] | Any) -> CachePolicy:
  """The policy `name` at the budget `cache.size`.

  Raises:
    ValueError: an unknown name, or a budget the policy cannot run (the message names the field).
  """
  spec = _spec(name)
  size = _get(cache, "size")
  if spec.sized is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
    raise ValueError(f"cache.size={size!r} must be a positive number of tokens for policy {name!r}")
  return with_kv_bits(spec.build(cache, size), _get(cache, "kv_bits"))


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
  spec = _spec(name)
  size = prefill_budget(cache, prompt_len=prompt_len, protocol=protocol, model_max_len=model_max_len)
  if spec.sized is None:
    return with_kv_bits(spec.build(cache, None), _get(cache, "kv_bits"))
  if spec.prefill is not None:
    return with_kv_bits(spec.prefill(cache, cfg, spec.reader(cache), prompt_len=prompt_len, protocol=protocol,
                                     model_max_len=model_max_len), _get(cache, "kv_bits"))
  return make_policy(name, {**_as_dict(cache), "size": size})
