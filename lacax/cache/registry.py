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
               `window` is also Finch's question length (the prompt's last `window` tokens);
  finch_chunk_length, finch_normalize_scores   Finch's chunked selection (None: one selection over the prompt)
               and its position normalisation of the question's attention (True);
  merge_threshold, exact_budget   KVMerger's cosine threshold (0.75) and whether it merges down to exactly
               `size` slots (True in the registry, so that it is compared at the same budget as the others;
               with False it merges by threshold only, the paper's mode, and `size` is an upper bound);
  rope_mode    the full cache's key storage ("slot" or "stored");
  kv_bits      8 stores any policy's cache as int8 with per-token scales (`lacax.cache.int8`); unset = float.
  h2o_score_norm, pyramid_budget_rule   the two definitions where the references and kvpress differ: H2O's
               summed attention ("sum", the reference) or kvpress's mean received attention ("mean"); PyramidKV's
               KVCache-Factory budgets ("kvcache_factory") or kvpress's window-inclusive ones ("kvpress").

Wrappers take their inner policy by name (kvpress's wrappers over any `ScorerPress`), built by this registry at
the same `cache.size` from the same `cache` section:

  inner        the scorer under adakv, perlayer, chunk, chunkkv, decoding, prefilldecoding, keyrerotation,
               criticalkv, criticaladakv, block, cam ("" by default: the wrapper's own default, "snapkv",
               and "knorm" for cam, whose inner must read no attention; any policy defining `keep_scores`:
               streaming, h2o, tova, snapkv, pyramidkv, keyrerotation, or a new scorer);
  alpha_safeguard   AdaKV's per-head safeguard fraction (0.2);
  layer_fractions   per-layer budgets as fractions of `size` (budget_l = max(1, round(f_l * size))); () =
               every layer `size`;
  chunk_length, chunkkv_length   Chunk's (1024) and ChunkKV's (20) chunk sizes;
  block_size   Block's block of tokens re-scored with the kept ones at each step (128);
  compression_interval   decode steps between DecodingPolicy's compressions (512), down to `size` tokens;
  target_compression_ratio   None, or r: DecodingPolicy (and prefilldecoding's decoding part) compresses to
               max(1, int(seen * (1 - r))) of the seen tokens instead (kvpress's CompressionRatioDecodingPress);
  first, second   the composed policy: `first` built at 2 * size, then `second` at size (built with the
               first's rope_mode when it has that field), so the composition holds at most `size` tokens.

The kvpress scorers (knorm, random, keydiff, lagkv, cur, leverage, qfilter, expectedattention;
`lacax.cache.base.ScorerPolicy`)
keep `size` tokens per (layer, row, KV head) and read:
  during_decode  False: compress the prompt at the prefill hand-off only (kvpress); True: evict every step;
  seed         Random's scores, LeverageScore's sketch, CUR's optional projection;
  key_space    KeyDiff / LagKV score keys "post_rope" (kvpress's cache keys) or "pre_rope";
  n_sink, lag_size   LagKV's sinks and partition length (n_sink is also CUR's num_sinks);
  leverage_type   CUR's combination of key and value leverage; sketch_dimension  LeverageScore's sketch;
  qfilter_path the Q-Filter file (`lacax.cache.qfilter.calibrate` + `save`; never downloaded);
  expected_attention_stats, n_future_positions   ExpectedAttention's query-statistics file
               (`lacax.cache.expected_attention.calibrate` + `save`) and RoPE averaging horizon (512);
  expected_attention_statistics   "calibrated" (the file) or "online" (the prompt's own queries, kvpress's
               default ExpectedAttentionPress).

Policies on the forward's other recorded statistics (`lacax.cache.kv_cache.StatsRecording`):
  think        ThinK key-channel pruning of prompts over `size` tokens: key_channel_compression_ratio (0.5),
               window (the observation window, shared with SnapKV);
  simlayerkv   SimLayerKV: lazy layers keep start_size initial + (size - start_size) recent tokens (n_recent =
               size - start_size + n_last, so a lazy layer holds exactly `size`), the others all;
               lazy_threshold (0.9);
  criticalkv   CriticalKV over `inner` (a wrapper): first_stage_ratio (0.5), critical_epsilon (1e-4);
  criticaladakv   CriticalAdaKV over `inner` (a wrapper): AdaKV's alpha_safeguard (0.2) with CriticalKV's
               first_stage_ratio and critical_epsilon.
  cam          CaM (a wrapper, decode-time): every compression_interval steps, evicted values merge into the
               merge_budget (32) kept tokens after them, then `size` tokens stay; inner (default knorm here: it
               must read no attention), cam_merge_probability ("bernoulli", or "threshold"), seed.
  noncausal    NonCausalAttn (the prompt's own queries, recorded): attention_chunk_size (256);
  compactor    Compactor: leverage + NonCausalAttn between sink_size_start (8) and sink_size_end (4) sinks;
               attention_chunk_size, sketch_dimension, seed, compactor_blending (None = the ratio 1 - size/n).

Head-wise patterns:
  duoattention DuoAttention: streaming heads keep start_size sinks + (size - start_size) recent prompt tokens
               (the registry's 4 sinks, not kvpress's 128), retrieval heads the whole prompt; duo_head_scores
               ([layers][kv_heads], `lacax.cache.duo_attention.calibrate`; never downloaded) with
               head_compression_ratio (0.0, kvpress: no head streams) the fraction of heads that stream, or
               duo_streaming_heads (the [layers][kv_heads] boolean mask itself).

Scores from an extra forward pass (`CachePolicy.after_prefill`, run by every prefill path):
  kvzip        KVzip context reconstruction: `size` tokens per (layer, kv head) on average, chosen over all
               layers and heads of a row (kvzip_layerwise=False, kvpress) or per layer (True); n_sink (4) always
               kept; kvzip_repeat_ids, kvzip_continue_ids, kvzip_suffix_ids the reconstruction prompts' token ids
               (`lacax.cache.kvzip.repeat_prompt_ids` with the model's tokenizer; () = the context alone);
               kvzip_chunk_size (2048) prompt tokens reconstructed per pass.

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

from lacax.cache.adakv import AdaKVPolicy
from lacax.cache.base import CachePolicy, is_scorer
from lacax.cache.block import BlockPolicy
from lacax.cache.cam import CAMPolicy
from lacax.cache.chunk import ChunkPolicy
from lacax.cache.chunkkv import ChunkKVPolicy
from lacax.cache.compactor import CompactorPolicy
from lacax.cache.composed import ComposedPolicy
from lacax.cache.decoding import DecodingPolicy
from lacax.cache.duo_attention import DuoAttentionPolicy
from lacax.cache.full import FullPolicy
from lacax.cache.key_rerotation import KeyRerotationPolicy
from lacax.cache.perlayer import PerLayerPolicy
from lacax.cache.prefill_decoding import PrefillDecodingPolicy
from lacax.cache.h2o import H2OPolicy
from lacax.cache.int8 import with_kv_bits
from lacax.cache.kvmerger import KVMergerPolicy
from lacax.cache.ladder import PREFILL_PROTOCOLS, LadderPolicy
from lacax.cache.pyramidkv import PyramidKVPolicy
from lacax.cache.snapkv import SnapKVPolicy
from lacax.cache.streaming import StreamingPolicy
from lacax.cache.tova import TOVAPolicy
from lacax.cache.criticaladakv import CriticalAdaKVPolicy
from lacax.cache.criticalkv import CriticalKVPolicy
from lacax.cache.cur import CURPolicy
from lacax.cache.expected_attention import ExpectedAttentionPolicy
from lacax.cache.finch import FinchPolicy
from lacax.cache.keydiff import KeyDiffPolicy
from lacax.cache.kvzip import KVzipPolicy
from lacax.cache.knorm import KnormPolicy
from lacax.cache.lagkv import LagKVPolicy
from lacax.cache.leverage import LeverageScorePolicy
from lacax.cache.noncausal import NonCausalAttnPolicy
from lacax.cache.qfilter import QFilterPolicy
from lacax.cache.random_policy import RandomPolicy
from lacax.cache.simlayerkv import SimLayerKVPolicy
from lacax.cache.think import ThinKPolicy
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
      policy's value of another field (the config's, else the dataclass default). None: the budget is the
      composite parts' (`composite`), or the policy has none (the full cache; see `budgeted`).
    overrides: policy field -> the registry's default where it deliberately differs from the dataclass's
      (documented in the module docstring).
    prefill: optional (cache config, model config, read, budget, prompt_len, protocol, model_max_len) ->
      policy, for a policy whose one-shot set-up is not just "the budget as `size`" (LaCache).
    composite: optional (cache config, budget) -> the policy fields that are other policies, built by name
      through this registry (the wrappers' `inner`).
  """

  cls: type[CachePolicy]
  fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
  sized: Callable[[int, Callable[[str], Any]], dict[str, Any]] | None = None
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  prefill: Callable[..., CachePolicy] | None = None
  composite: Callable[[Any, int], dict[str, Any]] | None = None

  @property
  def budgeted(self) -> bool:
    """The policy keeps a budget of tokens: its own (`sized`) or its parts' (`composite`); False only for a
    policy that keeps everything (the full cache)."""
    return self.sized is not None or self.composite is not None

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
    if self.composite is not None:
      kwargs.update(self.composite(cache, size))
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
    "h2o": PolicySpec(H2OPolicy, fields={**_SCORED, "h2o_score_norm": "score_norm"},
                      sized=lambda size, read: {"heavy": size // 2, "recent": size - size // 2}),
    "tova": PolicySpec(TOVAPolicy, fields=_SCORED, sized=lambda size, read: {"budget": size}),
    "snapkv": PolicySpec(SnapKVPolicy, fields=_WINDOW, sized=lambda size, read: {"capacity": size}),
    "pyramidkv": PolicySpec(PyramidKVPolicy, fields={**_WINDOW, "beta": "beta", "pyramid_budget_rule": "budget_rule"},
                            sized=lambda size, read: {"capacity": size}),
    "finch": PolicySpec(FinchPolicy, fields={"window": "window", "finch_chunk_length": "chunk_length",
                                             "finch_normalize_scores": "normalize_scores", **_SCORED},
                        sized=lambda size, read: {"capacity": size}),
    "kvmerger": PolicySpec(KVMergerPolicy, fields={"merge_threshold": "eps", "exact_budget": "exact_budget",
                                                   **_SCORED},
                           sized=lambda size, read: {"budget": size}, overrides={"exact_budget": True}),
}

# The kvpress scorers (lacax.cache.base.ScorerPolicy): `size` tokens kept per (layer, row, KV head).
_SCORER = {"during_decode": "during_decode"}
_BUDGET = lambda size, read: {"budget": size}  # noqa: E731
POLICIES.update({
    "knorm": PolicySpec(KnormPolicy, fields=_SCORER, sized=_BUDGET),
    "random": PolicySpec(RandomPolicy, fields={**_SCORER, "seed": "seed"}, sized=_BUDGET),
    "keydiff": PolicySpec(KeyDiffPolicy, fields={**_SCORER, "key_space": "key_space"}, sized=_BUDGET),
    "lagkv": PolicySpec(LagKVPolicy, fields={**_SCORER, "key_space": "key_space", "n_sink": "n_sink",
                                             "lag_size": "lag_size"}, sized=_BUDGET),
    "cur": PolicySpec(CURPolicy, fields={**_SCORER, "n_sink": "num_sinks", "leverage_type": "leverage_type",
                                         "seed": "seed"}, sized=_BUDGET),
    "leverage": PolicySpec(LeverageScorePolicy, fields={**_SCORER, "sketch_dimension": "sketch_dimension",
                                                        "seed": "seed"}, sized=_BUDGET),
    "qfilter": PolicySpec(QFilterPolicy, fields={**_SCORER, "qfilter_path": "filters_path"}, sized=_BUDGET),
    "expectedattention": PolicySpec(ExpectedAttentionPolicy, fields={
        **_SCORER, **_SCORED, "n_sink": "n_sink", "n_future_positions": "n_future_positions",
        "expected_attention_stats": "stats_path", "expected_attention_statistics": "statistics"}, sized=_BUDGET),
    # Policies on the forward's other statistics (lacax.cache.kv_cache.StatsRecording) and attention scores.
    "think": PolicySpec(ThinKPolicy, fields={"window": "window",
                                             "key_channel_compression_ratio": "key_channel_compression_ratio"},
                        sized=_BUDGET),
    "simlayerkv": PolicySpec(SimLayerKVPolicy, fields={"start_size": "n_initial", "lazy_threshold": "lazy_threshold"},
                             sized=lambda size, read: {"n_recent": size - read("n_initial") + read("n_last")}),
    "noncausal": PolicySpec(NonCausalAttnPolicy, fields={**_SCORER, "attention_chunk_size": "chunk_size"},
                            sized=_BUDGET),
    "compactor": PolicySpec(CompactorPolicy, fields={
        **_SCORER, "attention_chunk_size": "chunk_size", "sink_size_start": "sink_size_start",
        "sink_size_end": "sink_size_end", "sketch_dimension": "sketch_dimension", "seed": "seed",
        "compactor_blending": "blending"}, sized=_BUDGET),
    # Head-wise: streaming heads keep start_size sinks + (size - start_size) recent tokens, retrieval heads all.
    "duoattention": PolicySpec(DuoAttentionPolicy, fields={
        "start_size": "sink_size", "head_compression_ratio": "head_compression_ratio",
        "duo_head_scores": "head_scores", "duo_streaming_heads": "streaming_heads"},
                               sized=lambda size, read: {"recent_size": size - read("sink_size")},
                               overrides={"sink_size": 4}),
    # Scores by an extra forward pass (CachePolicy.after_prefill): `size` tokens per (layer, kv head) on average.
    "kvzip": PolicySpec(KVzipPolicy, fields={"n_sink": "n_sink", "kvzip_repeat_ids": "repeat_ids",
                                             "kvzip_continue_ids": "continue_ids", "kvzip_suffix_ids": "suffix_ids",
                                             "kvzip_chunk_size": "chunk_size", "kvzip_layerwise": "layerwise"},
                        sized=_BUDGET),
})


# The wrappers' config fields that name or size other policies (not fields of one dataclass, so their defaults
# live here, once).
COMPOSITE_DEFAULTS = {"inner": "", "first": "streaming", "second": "h2o", "layer_fractions": ()}
# The wrappers' own default inner policy, for `cache.inner` = "" (unset): SnapKV, except CaM, whose cache records
# its own attention sum, so that its inner scorer must read none.
_DEFAULT_INNER = "snapkv"
_OWN_DEFAULT_INNER = {"cam": "knorm"}
WRAPPERS = ("adakv", "perlayer", "composed", "chunk", "chunkkv", "decoding", "prefilldecoding", "keyrerotation",
            "criticalkv", "criticaladakv", "block", "cam")


def _named_policy(cache, field: str, owner: str, size: int, *, scorer: bool) -> CachePolicy:
  """The policy named by `cache.<field>`, built by this registry at budget `size` from the same section."""
  name = _get(cache, field, COMPOSITE_DEFAULTS[field])
  if field == "inner" and name in ("", None):
    name = _OWN_DEFAULT_INNER.get(owner, _DEFAULT_INNER)
  if not isinstance(name, str) or name not in POLICIES:
    raise ValueError(f"cache.{field}={name!r} for policy {owner!r} must name a registered policy; expected one "
                     f"of {sorted(POLICIES)}")
  if name == owner:
    raise ValueError(f"cache.{field}={name!r} for policy {owner!r} names the wrapper itself")
  # The parts of a composite are built in float: `cache.kv_bits` applies once, to the whole (an int8 inner would
  # no longer be a scorer, and a composition would quantize twice).
  policy = make_policy(name, {**_as_dict(cache), "size": size, "kv_bits": None})
  if scorer and not is_scorer(policy):
    scorers = sorted(n for n in POLICIES if n not in WRAPPERS and is_scorer(make_policy(n, {"size": 64})))
    raise ValueError(f"cache.{field}={name!r} for policy {owner!r} must name a scorer policy (one that ranks "
                     f"tokens: {scorers} or a scoring wrapper); {name!r} is not")
  return policy


def _inner(owner: str):
  return lambda cache, size: {"inner": _named_policy(cache, "inner", owner, size, scorer=True)}


def _layer_budgets(cache, size: int) -> dict[str, Any]:
  fractions = _get(cache, "layer_fractions", ())
  try:
    fractions = tuple(float(f) for f in fractions)
  except (TypeError, ValueError) as e:
    raise ValueError(f"cache.layer_fractions={fractions!r} must be a sequence of positive numbers, one per "
                     "layer (or () for every layer at cache.size)") from e
  if any(not f > 0 for f in fractions):
    raise ValueError(f"cache.layer_fractions={fractions!r} must hold positive numbers")
  inner = _inner("perlayer")(cache, size)
  # () = uniform; the layer count is checked against the model when the cache is built.
  return {**inner, "budgets": tuple(max(1, int(round(f * size))) for f in fractions) or (size,)}


def _composed(cache, size: int) -> dict[str, Any]:
  first = _named_policy(cache, "first", "composed", 2 * size, scorer=False)
  second = _named_policy(cache, "second", "composed", size, scorer=False)
  if second.rope_mode != first.rope_mode and "rope_mode" in {f.name for f in dataclasses.fields(second)}:
    second = dataclasses.replace(second, rope_mode=first.rope_mode)
  return {"first": first, "second": second}


def _prefill_decoding(cache, size: int) -> dict[str, Any]:
  inner = _inner("prefilldecoding")(cache, size)["inner"]
  read = POLICIES["decoding"].reader(cache)
  return {"prefill": inner, "decoding": DecodingPolicy(
      inner, target_size=size, compression_interval=read("compression_interval"),
      target_compression_ratio=read("target_compression_ratio"))}


POLICIES.update({
    "adakv": PolicySpec(AdaKVPolicy, fields={"alpha_safeguard": "alpha_safeguard"},
                        sized=lambda size, read: {"budget": size}, composite=_inner("adakv")),
    "perlayer": PolicySpec(PerLayerPolicy, composite=_layer_budgets),
    "composed": PolicySpec(ComposedPolicy, composite=_composed),
    "chunk": PolicySpec(ChunkPolicy, fields={"chunk_length": "chunk_length"},
                        sized=lambda size, read: {"budget": size}, composite=_inner("chunk")),
    "chunkkv": PolicySpec(ChunkKVPolicy, fields={"chunkkv_length": "chunk_length"},
                          sized=lambda size, read: {"budget": size}, composite=_inner("chunkkv")),
    "decoding": PolicySpec(DecodingPolicy, fields={"compression_interval": "compression_interval",
                                                   "target_compression_ratio": "target_compression_ratio"},
                           sized=lambda size, read: {"target_size": size}, composite=_inner("decoding")),
    "prefilldecoding": PolicySpec(PrefillDecodingPolicy, composite=_prefill_decoding),
    "keyrerotation": PolicySpec(KeyRerotationPolicy, composite=_inner("keyrerotation")),
    "criticalkv": PolicySpec(CriticalKVPolicy, fields={"critical_epsilon": "epsilon",
                                                       "first_stage_ratio": "first_stage_ratio"},
                             sized=lambda size, read: {"budget": size}, composite=_inner("criticalkv")),
    "criticaladakv": PolicySpec(CriticalAdaKVPolicy, fields={"alpha_safeguard": "alpha_safeguard",
                                                             "critical_epsilon": "epsilon",
                                                             "first_stage_ratio": "first_stage_ratio"},
                                sized=lambda size, read: {"budget": size}, composite=_inner("criticaladakv")),
    "block": PolicySpec(BlockPolicy, fields={"block_size": "block_size"}, sized=lambda size, read: {"budget": size},
                        composite=_inner("block")),
    "cam": PolicySpec(CAMPolicy, fields={"compression_interval": "compression_interval",
                                         "merge_budget": "merge_budget", "seed": "seed",
                                         "cam_merge_probability": "merge_probability"},
                      sized=lambda size, read: {"target_size": size}, composite=_inner("cam")),
})


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
    if spec.composite is not None:
      for field, default in COMPOSITE_DEFAULTS.items():
        out.setdefault(field, default)
  return out


def make_policy(name: str, cache: Mapping[str, Any] | Any) -> CachePolicy:
  """The policy `name` at the budget `cache.size`.

  Raises:
    ValueError: an unknown name, or a budget the policy cannot run (the message names the field).
  """
  spec = _spec(name)
  size = _get(cache, "size")
  if spec.budgeted and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
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
  if not spec.budgeted:
    return with_kv_bits(spec.build(cache, None), _get(cache, "kv_bits"))
  if spec.prefill is not None:
    return with_kv_bits(spec.prefill(cache, cfg, spec.reader(cache), prompt_len=prompt_len, protocol=protocol,
                                     model_max_len=model_max_len), _get(cache, "kv_bits"))
  return make_policy(name, {**_as_dict(cache), "size": size})
