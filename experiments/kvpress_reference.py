"""kvpress (NVIDIA/kvpress, PyPI `kvpress`) as a parity reference for lacax's cache policies.

  python -m experiments.kvpress_reference            # SmolLM2-135M (the slow variant): writes a JSON record
  python -m experiments.kvpress_reference --tiny     # the tiny random Llama of the tests

kvpress 0.5.5 requires transformers<5.3 while lacax's test extra has transformers>=5 (5.24 installed), so it
cannot share lacax's environment (and `python -m venv --system-site-packages` would still see the newer
transformers). `ensure_env()` builds its own virtual environment once, `pip install torch==<lacax's torch>
kvpress==<KVPRESS_VERSION> gguf` (gguf: transformers reads SmolLM2's GGUF file with it; torch comes from
the local wheel cache where there is one), cached under
`$LACAX_CACHE_DIR/kvpress-ref/` (default ~/.cache/lacax), and reuses it afterwards. `experiments/kvpress_worker.py`
runs inside it: it prefills a Hugging Face checkpoint under each press and reports the kept positions per layer
and KV head and the greedy continuation. `lacax_side` does the same in lacax on the same checkpoint (loaded by
lacax's HF loader): full prefill, one compaction to the same budget, greedy decode without further eviction
(kvpress's protocol: presses compress during prefill only, and decoding continues at the original positions).

`METHODS` pairs each lacax policy with its press: adding a method is one `MethodPair`.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

KVPRESS_VERSION = "0.5.5"
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kvpress_worker.py")


class EnvUnavailable(RuntimeError):
  """The kvpress environment cannot be built here (no registry access, no wheel for this platform, ...)."""


@dataclasses.dataclass(frozen=True)
class MethodPair:
  """One method as lacax and kvpress name it.

  Attributes:
    key: the name of the pair (test ids, JSON keys).
    policy: the lacax registry name.
    press: the kvpress class name; press_kwargs: its arguments besides compression_ratio.
    cache: `cache` config fields for lacax's registry (window, kernel, ...), to match the press's settings.
    replace: policy fields set after the registry built it (e.g. rope_mode="original": kvpress keeps keys at
      their original positions).
    status: "exact" (same kept positions and greedy tokens), "differs" (a known difference of definition,
      `note`), or "not_comparable" (`note` says why).
    kvpress_definition: for "differs": the lacax `cache` fields that select kvpress's definition, once lacax
      has that option (then the pair is checked as exact with them); None until it lands.
    prefill_attention: the attention implementation of kvpress's prefill: "eager" (observed-attention presses
      read its weights) or "sdpa" (head-wise presses, which mask keys through kvpress's attention patch and
      assert a non-eager attention).
    question_tokens: q > 0 for FinchPress: the worker puts its delimiter before the prompt's last q tokens.
    pattern: for DuoAttentionPress, the head pattern both sides get ({"sink_size", "recent_size",
      "head_scores"}; the worker hands it to kvpress in place of the download).
    tokenizer: for KVzipPress, {text: [ids]} for the texts it encodes (the tiny model has no tokenizer; the
      worker serves them from a stub, lacax gets the same ids as `kvzip_repeat_ids`).
  """

  key: str
  policy: str
  press: str
  press_kwargs: dict = dataclasses.field(default_factory=dict)
  cache: dict = dataclasses.field(default_factory=dict)
  replace: dict = dataclasses.field(default_factory=dict)
  status: str = "exact"
  note: str = ""
  kvpress_definition: dict | None = None
  prefill_attention: str = "eager"
  question_tokens: int = 0
  pattern: dict | None = None
  tokenizer: dict | None = None


_WINDOW = 8  # the prompts are short: a window below kvpress's default 64
_PROMPT = 64  # the parity prompt's length (tests/test_kvpress_parity.py), for presses sized in tokens
_LAZY = 0.5  # SimLayerKV's threshold, between the tiny random model's layers' attention masses
# DuoAttention's head pattern for the tiny Llama (3 layers x 2 kv heads): distinct scores, so kvpress's
# np.argsort and lacax's stable sort pick the same 3 streaming heads; streaming heads keep 4 + 28 tokens (lacax's
# registry: start_size sinks + size - start_size recent, size = 32 for the 64-token prompt at ratio 0.5).
_DUO_SCORES = ((0.9, 0.2), (0.1, 0.7), (0.4, 0.6))
# KVzip's reconstruction prompts for the tiny model (no tokenizer): made-up ids for kvpress's two repeat
# instructions and the no-template suffix "\n"; the empty chat prefix encodes to nothing. Chunks of 24 tokens, so
# the 64-token prompt is reconstructed in three passes (kvpress's default chunk is 2048).
_KVZIP_IDS = {"\n\nRepeat the previous context exactly.": [7, 19, 42, 88, 3, 51],
              "\n\nRepeat the part of the previous context exactly, starting with": [7, 19, 42, 60, 3, 77, 90],
              "\n": [11], "": []}
METHODS: tuple[MethodPair, ...] = (
    MethodPair("streaming", "streaming", "StreamingLLMPress", {"n_sink": 4}, {"start_size": 4},
               {"rope_mode": "original"}),
    MethodPair("snapkv", "snapkv", "SnapKVPress", {"window_size": _WINDOW, "kernel_size": 5},
               {"window": _WINDOW, "kernel": 5, "pooling": "avg", "score_agg": "mean"}),
    MethodPair("tova", "tova", "TOVAPress", {}, {"score_agg": "mean"}, status="differs",
               note=("the prompt's last token: kvpress always keeps it (tova_press.py pads its score with "
                     "max + 1), lacax ranks it by the last query's attention to itself like every other key, as "
                     "the TOVA reference (src/tova_cache.py) does; the other kept positions are the same (on the "
                     "test prompt only layer 1 differs, by that token)"),
               kvpress_definition=None),
    MethodPair("h2o", "h2o", "ObservedAttentionPress", {}, {"score_agg": "mean"}, status="differs",
               note=("lacax's H2O keeps budget/2 recent tokens + budget/2 heavy hitters by attention summed over "
                     "the queries (lacax/cache/h2o.py, the H2O reference); kvpress's ObservedAttentionPress keeps "
                     "the top budget by attention averaged over the queries that see each key "
                     "(kvpress/presses/observed_attention_press.py), with no recent window"),
               # cache.h2o_score_norm="mean" is kvpress's normalisation, but lacax's H2O also keeps a recent
               # window (heavy + recent) that ObservedAttentionPress has not, so that option alone does not
               # reproduce kvpress's kept set: checked, it differs on the test prompt.
               kvpress_definition=None),
    MethodPair("pyramidkv", "pyramidkv", "PyramidKVPress", {"window_size": _WINDOW, "kernel_size": 5, "beta": 20},
               {"window": _WINDOW, "kernel": 5, "pooling": "avg", "beta": 20, "score_agg": "mean"},
               status="differs",
               note=("per-layer budgets: lacax follows KVCache-Factory (min = (cap - w) / beta, max = 2 (cap - w) - "
                     "min, the window on top; lacax/cache/pyramidkv.py), kvpress counts the window inside each "
                     "layer's budget (kvpress/presses/pyramidkv_press.py)"),
               kvpress_definition={"pyramid_budget_rule": "kvpress"}),
    # The kvpress scorers lacax has on base.ScorerPolicy.
    MethodPair("knorm", "knorm", "KnormPress"),
    # kvpress's ExpectedAttentionPress estimates the query statistics from each prompt: lacax's online statistics
    # (the calibrated default is kvpress's ExpectedAttentionStatsPress, whose statistics are downloaded).
    MethodPair("expectedattention", "expectedattention", "ExpectedAttentionPress", {},
               {"expected_attention_statistics": "online"}),
    MethodPair("keydiff", "keydiff", "KeyDiffPress"),
    MethodPair("lagkv", "lagkv", "LagKVPress", {"n_sink": 4, "lag_size": 8}, {"n_sink": 4, "lag_size": 8},
               status="differs",
               note=("ties: without cross_scoring a token's score is its rank inside its partition / lag_size, so "
                     "every partition holds the same score values; torch.topk (kvpress/presses/scorer_press.py) "
                     "and lacax's top-k (older token first, lacax/cache/plans.py) break those ties differently "
                     "(on the test prompt: one token of layer 0, KV head 0)")),
    MethodPair("random", "random", "RandomPress", status="not_comparable",
               note="random scores: torch's and JAX's generators draw different numbers"),
    # Finch: the question is the prompt's last _WINDOW tokens (kvpress: after its delimiter, which the worker
    # inserts). rerotate_keys=False keeps the keys where the worker can match them (lacax's rope_mode="original").
    MethodPair("finch", "finch", "FinchPress", {"rerotate_keys": False}, {"window": _WINDOW},
               question_tokens=_WINDOW),
    MethodPair("finch_chunked", "finch", "FinchPress", {"rerotate_keys": False, "chunk_length": 24},
               {"window": _WINDOW, "finch_chunk_length": 24}, question_tokens=_WINDOW),
    # The policies on the forward's other recorded statistics (lacax.cache.kv_cache.StatsRecording).
    MethodPair("criticalkv", "criticalkv", "CriticalKVPress", {"press": {"press": "KnormPress"}}, {"inner": "knorm"}),
    # Head-wise budgets: kvpress masks the evicted keys (the worker reads the unmasked ones), lacax drops them.
    MethodPair("adakv", "adakv", "AdaKVPress", {"press": {"press": "KnormPress"}}, {"inner": "knorm"},
               prefill_attention="sdpa", status="differs",
               note=("ties: layer 0's keys depend only on the token and its position, and key norms not on the "
                     "position, so a token repeated in the prompt scores exactly the same twice; at the layer's "
                     "budget boundary torch.topk over the flattened heads (kvpress/presses/adakv_press.py) and "
                     "lacax's ranking (older token first, lacax/cache/plans.py) keep different copies (on the test "
                     "prompt: positions 44 and 61 of layer 0, KV head 0; the greedy tokens agree)")),
    MethodPair("criticaladakv", "criticaladakv", "CriticalAdaKVPress", {"press": {"press": "KnormPress"}},
               {"inner": "knorm"}, prefill_attention="sdpa"),
    # Block over KeyDiff (the KeyDiff paper's block prompt processing): the anchor is re-computed per block.
    # kvpress's BlockPress asserts that it gets no attention weights, hence SDPA.
    MethodPair("block", "block", "BlockPress", {"press": {"press": "KeyDiffPress"}, "block_size": 8},
               {"inner": "keydiff", "block_size": 8}, prefill_attention="sdpa"),
    MethodPair("think", "think", "ThinKPress", {"key_channel_compression_ratio": 0.5, "window_size": _WINDOW},
               {"key_channel_compression_ratio": 0.5, "window": _WINDOW}),
    # A lazy layer keeps n_initial + n_recent - n_last = the budget (lacax's registry sizes n_recent so; the
    # kvpress side is sized for the parity test's compression ratio 0.5). On the test prompt layers 1 and 2 are
    # lazy (attention masses 0.47, 0.54, 0.53 against the threshold 0.5).
    MethodPair("simlayerkv", "simlayerkv", "SimLayerKVPress",
               {"lazy_threshold": _LAZY, "n_initial": 4, "n_recent": _PROMPT // 2 - 4 + 1, "n_last": 1},
               {"lazy_threshold": _LAZY, "start_size": 4}),
    # NonCausalAttn in chunks of 16 (the 64-token prompt ends in a full chunk); Compactor with its default chunk
    # of 256, so the 52 tokens between its sinks are one zero-padded chunk (kvpress's 0 / -1e-9 padding logits).
    # Compactor's leverage term uses an unseeded torch.randn sketch in kvpress, so the pair runs with
    # blending=0 (attention + sinks, token for token); the leverage term is LeverageScore's (its own tests).
    MethodPair("noncausal", "noncausal", "NonCausalAttnPress", {"chunk_size": 16}, {"attention_chunk_size": 16}),
    MethodPair("compactor", "compactor", "CompactorPress", {"blending": 0.0}, {"compactor_blending": 0.0}),
    MethodPair("cam", "cam", "CAMPress", status="not_comparable",
               note=("decode-time (this protocol compresses the prompt once, at prefill) and random: kvpress draws "
                     "the merges with torch.bernoulli; tests/test_cache_cam.py restates one CaM step in NumPy "
                     "with lacax's draws")),
    # Head-wise: kvpress masks the streaming heads' middle keys (fake keys in decoding), lacax drops them.
    MethodPair("duoattention", "duoattention", "DuoAttentionPress", {"head_compression_ratio": 0.5},
               {"start_size": 4, "head_compression_ratio": 0.5, "duo_head_scores": _DUO_SCORES},
               pattern={"sink_size": 4, "recent_size": _PROMPT // 2 - 4, "head_scores": _DUO_SCORES},
               prefill_attention="sdpa"),
    # One budget over all layers and heads; three reconstruction passes.
    MethodPair("kvzip", "kvzip", "KVzipPress", {"n_sink": 4, "chunk_size": 24},
               {"n_sink": 4, "kvzip_chunk_size": 24, "kvzip_repeat_ids": (7, 19, 42, 88, 3, 51),
                "kvzip_continue_ids": (7, 19, 42, 60, 3, 77, 90), "kvzip_suffix_ids": (11,)}, tokenizer=_KVZIP_IDS,
               prefill_attention="sdpa"),
)


def pairs_for(prompt_len: int, num_layers: int, num_kv_heads: int, encode=None, *, compression_ratio: float = 0.5,
              pairs: Sequence[MethodPair] = METHODS) -> tuple[MethodPair, ...]:
  """`pairs` resized for another model and prompt than the tests' tiny Llama and 64-token prompt (SmolLM2).

  The sizes METHODS fixes for the tiny model follow the prompt and the model: SimLayerKV's n_recent (a lazy
  layer keeps the budget), DuoAttention's head pattern (distinct seeded scores for every (layer, kv head), and
  its streaming heads' recent tokens), and KVzip's reconstruction prompts (`encode(text) -> ids`: the model's
  own tokenizer, served to kvpress by the worker's stub, and the same ids to lacax) with chunks of a quarter
  of the prompt (four reconstruction passes).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  keep = int(prompt_len * (1 - compression_ratio))  # the budget both sides compress to
  scores = tuple(tuple(float(s) for s in row)
                 for row in np.random.RandomState(0).permutation(num_layers * num_kv_heads).reshape(
                     num_layers, num_kv_heads) / (num_layers * num_kv_heads))
  out = []
  for p in pairs:
    if p.key == "simlayerkv":
      p = dataclasses.replace(p, press_kwargs={**p.press_kwargs, "n_recent": keep - 4 + 1})
    elif p.key == "duoattention":
      p = dataclasses.replace(p, cache={**p.cache, "duo_head_scores": scores},
                              pattern={**p.pattern, "recent_size": keep - 4, "head_scores": scores})
    elif p.key == "kvzip" and encode is not None:
      ids = {text: [int(i) for i in encode(text)] for text in _KVZIP_IDS}
      texts = list(_KVZIP_IDS)  # repeat, continue, suffix, prefix (see _KVZIP_IDS)
      chunk = max(24, -(-prompt_len // 4))
      p = dataclasses.replace(p, tokenizer=ids, press_kwargs={**p.press_kwargs, "chunk_size": chunk},
                              cache={**p.cache, "kvzip_chunk_size": chunk,
                                     "kvzip_repeat_ids": tuple(ids[texts[0]]),
                                     "kvzip_continue_ids": tuple(ids[texts[1]]),
                                     "kvzip_suffix_ids": tuple(ids[texts[2]])})
    out.append(p)
  return tuple(out)


def cache_root() -> str:
  return os.path.join(os.environ.get("LACAX_CACHE_DIR") or os.path.expanduser("~/.cache/lacax"), "kvpress-ref")


def _torch_version() -> str:
  return importlib.metadata.version("torch").split("+")[0]


def ensure_env(root: str | None = None, *, timeout: float = 1800) -> tuple[str, dict[str, Any]]:
  """(python of the kvpress environment, {"created": bool, "seconds": build time}); built once, then reused.

  Raises:
    EnvUnavailable: the venv or the pip install failed (the reason is pip's last lines).
  """
  root = root or cache_root()
  env = os.path.join(root, f"kvpress-{KVPRESS_VERSION}-torch-{_torch_version()}")
  python = os.path.join(env, "bin", "python")
  ready = os.path.join(env, "ready.json")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel test processes)
    if os.path.isfile(ready) and os.path.isfile(python):
      with open(ready) as f:
        return python, {"created": False, **json.load(f)}
    start = time.perf_counter()
    subprocess.run(["rm", "-rf", env], check=True)
    steps = [[sys.executable, "-m", "venv", env],
             [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--retries", "2",
              f"torch=={_torch_version()}", f"kvpress=={KVPRESS_VERSION}", "gguf"]]
    for step in steps:
      try:
        done = subprocess.run(step, capture_output=True, text=True, timeout=timeout)
      except (OSError, subprocess.TimeoutExpired) as e:
        raise EnvUnavailable(f"{' '.join(step[:4])} ...: {e}") from None
      if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise EnvUnavailable(f"{' '.join(step[:4])} ... exited {done.returncode}: {tail}")
    record = {"seconds": time.perf_counter() - start, "kvpress": KVPRESS_VERSION, "torch": _torch_version()}
    with open(ready, "w") as f:
      json.dump(record, f)
    return python, {"created": True, **record}


def run_kvpress(python: str, model_dir: str, prompt: Sequence[int], pairs: Sequence[MethodPair],
                compression_ratio: float, new_tokens: int, *, timeout: float = 900) -> dict[str, Any]:
  """The kvpress side for every pair, in one worker process (torch and kvpress import once)."""
  request = {"model_dir": model_dir, "prompt": [int(t) for t in prompt], "new_tokens": new_tokens,
             "presses": [{"key": p.key, "press": p.press, "pattern": p.pattern, "tokenizer": p.tokenizer,
                          "kwargs": {"compression_ratio": compression_ratio, **p.press_kwargs},
                          "prefill_attention": p.prefill_attention, "question_tokens": p.question_tokens}
                         for p in pairs]}
  with tempfile.TemporaryDirectory(prefix="lacax_kvpress_") as tmp:
    request_path, response_path = os.path.join(tmp, "request.json"), os.path.join(tmp, "response.json")
    with open(request_path, "w") as f:
      json.dump(request, f)
    done = subprocess.run([python, _WORKER, request_path, response_path], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp)
    if done.returncode != 0:
      raise RuntimeError(f"the kvpress worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(response_path) as f:
      return json.load(f)


def lacax_policy(pair: MethodPair, cfg, prompt_len: int, compression_ratio: float, *, definition: dict | None = None):
  """The lacax policy of `pair` at kvpress's budget: int(prompt_len * (1 - compression_ratio)) tokens."""
  from lacax.cache import registry  # pylint: disable=g-import-not-at-top

  cache = {**registry.cache_defaults(), **pair.cache, **(definition or {}), "budget": 1.0 - compression_ratio}
  policy = registry.make_prefill_policy(pair.policy, cache, cfg, prompt_len=prompt_len, protocol="niah")
  return dataclasses.replace(policy, **pair.replace) if pair.replace else policy


_FORWARD = None


def lacax_side(params, cfg, prompt: Sequence[int], policy, new_tokens: int) -> dict[str, Any]:
  """Prefill, one compaction, greedy decode without eviction: {"kept": {layer: [[pos] per KV head]}, "tokens"}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from lacax.model import llama  # pylint: disable=g-import-not-at-top

  global _FORWARD
  if _FORWARD is None:  # one jitted forward for every pair: pairs with the same cache layout share compilations
    _FORWARD = jax.jit(llama.forward, static_argnames="cfg")
  forward = _FORWARD
  n = len(prompt)
  capacity = n + new_tokens
  cache = policy.init(cfg, 1, capacity)
  logits, cache = forward(params, jnp.asarray([prompt], jnp.int32), jnp.arange(n, dtype=jnp.int32)[None], cache,
                          cfg=cfg)
  pruned = np.asarray(policy.pruned(cache))[:, 0] if hasattr(policy, "pruned") else None  # ThinK: [L, KV, D]
  cache = policy.after_prefill(params, cfg, cache, jnp.asarray([prompt], jnp.int32),
                               jnp.asarray([n], jnp.int32))  # KVzip's reconstruction
  ranked = _ranked_by_position(policy, cache)
  cache = policy.compact(cache, capacity=capacity)
  pos = np.asarray(cache.pos)[:, 0]  # [L, S, KV]
  kept = {str(layer): [sorted(int(p) for p in pos[layer, :, h] if p >= 0) for h in range(pos.shape[-1])]
          for layer in range(pos.shape[0])}
  tokens = [int(jnp.argmax(logits[0, n - 1]))]
  for i in range(new_tokens - 1):
    logits, cache = forward(params, jnp.asarray([[tokens[-1]]], jnp.int32), jnp.asarray([[n + i]], jnp.int32),
                            cache, cfg=cfg)
    tokens.append(int(jnp.argmax(logits[0, 0])))
  out = {"kept": kept, "tokens": tokens}
  if ranked is not None:
    out["_ranked"] = ranked  # not JSON: `compare` reads it for `ties_only` and drops it
  if pruned is not None and pruned.any():  # key channels zeroed (ThinK), as the worker reports kvpress's
    out["pruned"] = {str(layer): [sorted(int(c) for c in np.nonzero(heads)[0]) for heads in pruned[layer]]
                     for layer in range(pruned.shape[0])}
  return out


def _ranked_by_position(policy, cache):
  """[L, positions, KV] float32: the score by which `policy` (or, for a wrapper that is no scorer itself, its
  inner policy) ranks each prompt token before the compaction, protected tokens at +inf; None for policies
  that score nothing (full, LaCache). The prefill cache holds the prompt in position order, slot = position."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from lacax.cache import base  # pylint: disable=g-import-not-at-top

  scorer = policy if base.is_scorer(policy) else getattr(policy, "inner", None)
  if scorer is None or not base.is_scorer(scorer):
    return None
  scores, protected = scorer.keep_scores(cache)
  ranked = np.asarray(base.ranked_scores(scores, protected))[:, 0]  # [L, S, KV]
  pos = np.asarray(cache.pos)[:, 0]  # [L, S, KV]
  if not np.all((pos < 0) | (pos == np.arange(pos.shape[1])[None, :, None])):
    return None  # not slot = position (a policy that reorders at prefill): no tie check
  return ranked


def ties_only(ours: dict, theirs: dict, ranked, *, rtol: float = 1e-5) -> bool | None:
  """Whether two kept sets differ only by tokens of equal score: in every (layer, KV head), the positions only
  lacax keeps and those only kvpress keeps have the same lacax scores up to `rtol` (float32 rounding: the two
  sides compute the same score in different arithmetic, and near-ties flip). Such a difference is a tie-breaking
  order (lacax: older token first; torch.topk on CPU kept the newer one in every case seen), not a method's.
  None when lacax has no scores for the policy."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  if ranked is None:
    return None
  for layer, heads in theirs.items():
    for head, kept in enumerate(heads):
      a, b = set(ours[layer][head]), set(kept)
      if len(a) != len(b):
        return False
      mine = np.sort(ranked[int(layer), sorted(a - b), head])
      other = np.sort(ranked[int(layer), sorted(b - a), head])
      if not np.allclose(mine, other, rtol=rtol, atol=0.0):
        return False
  return True


def available_pairs(pairs: Sequence[MethodPair] = METHODS) -> list[MethodPair]:
  """The pairs whose lacax policy is registered and whose kvpress side is comparable."""
  from lacax.cache import registry  # pylint: disable=g-import-not-at-top

  return [p for p in pairs if p.policy in registry.POLICIES and p.status != "not_comparable"]


def compare(model_dir: str, prompt: Sequence[int], *, compression_ratio: float = 0.5, new_tokens: int = 8,
            params=None, cfg=None, pairs: Sequence[MethodPair] = METHODS) -> dict[str, Any]:
  """Both sides for every available pair on one checkpoint and prompt: {key: {"kvpress", "lacax", "same_kept",
  "ties_only", "same_tokens", "status", "note"}} plus "_env" (the environment's build record) and "_versions".
  A pair with `kvpress_definition` also runs as "<key>@kvpress" with that definition."""
  from lacax.weights import hf  # pylint: disable=g-import-not-at-top

  python, env = ensure_env()
  pairs = available_pairs(pairs)
  # The "differs" pairs whose difference lacax can switch off are also run with kvpress's definition, as the test.
  all_pairs = pairs + [dataclasses.replace(p, key=p.key + "@kvpress") for p in pairs if p.kvpress_definition]
  reference = run_kvpress(python, model_dir, prompt, all_pairs, compression_ratio, new_tokens)
  if params is None:
    cfg, params = hf.load_hf_checkpoint(model_dir)
  out: dict[str, Any] = {"_env": env, "_versions": reference.pop("_versions")}
  for pair in all_pairs:
    definition = pair.kvpress_definition if pair.key.endswith("@kvpress") else None
    ours = lacax_side(params, cfg, prompt, lacax_policy(pair, cfg, len(prompt), compression_ratio,
                                                        definition=definition), new_tokens)
    ranked = ours.pop("_ranked", None)
    theirs = reference[pair.key]
    same = ours["kept"] == theirs["kept"]
    out[pair.key] = {"kvpress": theirs, "lacax": ours, "same_kept": same,
                     "ties_only": True if same else ties_only(ours["kept"], theirs["kept"], ranked),
                     "same_tokens": ours["tokens"] == theirs["tokens"], "status": pair.status, "note": pair.note}
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="the tiny random Llama instead of SmolLM2-135M")
  parser.add_argument("--prompt_tokens", type=int, default=512)
  parser.add_argument("--compression_ratio", type=float, default=0.5)
  parser.add_argument("--new_tokens", type=int, default=16)
  parser.add_argument("--out", default="results/kvpress_parity")
  args = parser.parse_args(argv)
  from lacax import results  # pylint: disable=g-import-not-at-top
  from lacax.eval.texts import default_text  # pylint: disable=g-import-not-at-top

  if args.tiny:
    from tests import hf_models  # pylint: disable=g-import-not-at-top
    model_dir, _ = hf_models.saved_model("llama_tied")
    import numpy as np  # pylint: disable=g-import-not-at-top
    prompt = np.random.RandomState(0).randint(0, 113, args.prompt_tokens).tolist()
    out = compare(model_dir, prompt, compression_ratio=args.compression_ratio, new_tokens=args.new_tokens)
  else:  # SmolLM2-135M: both sides read the embedded GGUF file (transformers dequantizes it as lacax does)
    from lacax.weights import loader  # pylint: disable=g-import-not-at-top
    model = loader.load_model()
    model_dir = loader.default_model_path()
    prompt = model.tokenizer.encode(default_text())[:args.prompt_tokens]
    pairs = pairs_for(len(prompt), model.cfg.num_layers, model.cfg.num_kv_heads,
                      lambda text: model.tokenizer.encode(text, add_bos=False),
                      compression_ratio=args.compression_ratio)
    out = compare(model_dir, prompt, compression_ratio=args.compression_ratio, new_tokens=args.new_tokens,
                  params=model.params, cfg=model.cfg, pairs=pairs)
  path = results.timestamped_path(args.out)
  results.write_json(path, {"model": "tiny" if args.tiny else "SmolLM2-135M", "prompt_tokens": len(prompt),
                            "compression_ratio": args.compression_ratio, "new_tokens": args.new_tokens,
                            "cpu": results.cpu_model(), **out})
  print(f"{'method':<22}{'status':<16}{'same kept':>10}{'ties only':>10}{'same tokens':>13}")
  for key, row in out.items():
    if not key.startswith("_"):
      print(f"{key:<22}{row['status']:<16}{str(row['same_kept']):>10}{str(row['ties_only']):>10}"
            f"{str(row['same_tokens']):>13}")
  print(f"kvpress environment: {out['_env']}\nwritten: {path}")


if __name__ == "__main__":
  main()
