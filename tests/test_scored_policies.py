"""Score-based policies (H2O, TOVA, SnapKV, PyramidKV): kept sets against brute-force numpy statements of each
rule, GQA score semantics against Hugging Face attention weights, and end-to-end generation."""

import dataclasses
import functools

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from lacax import generate as generation
from lacax.cache import plans
from lacax.cache.full import FullPolicy
from lacax.cache.h2o import H2OPolicy
from lacax.cache.kvmerger import KVMergerPolicy
from lacax.cache.pyramidkv import PyramidKVPolicy, pyramid_budgets
from lacax.cache.snapkv import SnapKVPolicy
from lacax.cache.streaming import StreamingPolicy
from lacax.cache.tova import TOVAPolicy
from lacax.model import config as config_lib
from lacax.model import llama
from lacax.weights import hf
from tests import hf_models


def tiny_cfg(num_layers=3, num_kv_heads=3, group=2):
  return config_lib.ModelConfig(vocab_size=101, hidden_size=8 * num_kv_heads * group, intermediate_size=16,
                                num_layers=num_layers, num_heads=num_kv_heads * group, num_kv_heads=num_kv_heads,
                                head_dim=8)


def synthetic_cache(policy, cfg, batch, capacity, pos, scores):
  """A cache of `policy` holding positions `pos` [L, B, S, KV] (-1 empty) with `scores`; k/v encode the position."""
  cache = policy.init(cfg, batch, capacity)
  pos = np.asarray(pos, np.int32)
  k = np.zeros(cache.k.shape, np.float32)
  k[..., 0] = pos
  v = np.zeros(cache.v.shape, np.float32)
  v[..., 1] = pos + 0.5
  length = np.max(np.sum(pos >= 0, axis=2), axis=-1).astype(np.int32)
  return cache.replace(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos), length=jnp.asarray(length),
                       scores=jnp.asarray(scores, jnp.float32))


def random_scores(rng, shape, ties):
  # Dyadic values keep every sum exact, so the jnp and numpy pooling agree bit for bit and ties are real ties.
  return rng.randint(0, 4, shape) / 4.0 if ties else rng.rand(*shape)


def front_packed_positions(rng, num_layers, batch, capacity, kv_heads, counts, shared_heads=False):
  """pos [L, B, S, KV]: counts[l, b] increasing (non-contiguous, per-head different) positions, then -1."""
  pos = np.full((num_layers, batch, capacity, kv_heads), -1, np.int32)
  for l in range(num_layers):
    for b in range(batch):
      n = counts[l, b]
      for h in range(kv_heads):
        if shared_heads and h:
          pos[l, b, :, h] = pos[l, b, :, 0]
        else:
          pos[l, b, :n, h] = np.sort(rng.choice(4 * capacity, n, replace=False))
  return pos


def kept_positions(cache):
  """{(l, b, h): list of positions in slot order} and a check that occupied slots are front-packed."""
  pos = np.asarray(cache.pos)
  out = {}
  for l, b, h in np.ndindex(pos.shape[0], pos.shape[1], pos.shape[3]):
    p = pos[l, b, :, h]
    n = int(np.sum(p >= 0))
    assert np.all(p[:n] >= 0) and np.all(p[n:] == -1), f"slots of {(l, b, h)} are not front-packed: {p}"
    out[(l, b, h)] = p[:n].tolist()
  return out


def top_by_score(slots, score):
  """The slots in order of decreasing score, ties to the older (smaller) slot."""
  return sorted(slots, key=lambda s: (-score[s], s))


# ----------------------------------------------------------------------------------------------------------------
# Brute-force statements of each reference rule (loops over layers, rows, heads; slot indices in time order).
# ----------------------------------------------------------------------------------------------------------------


def rule_h2o(pos, scores, heavy, recent):
  kept = {}
  for l, b, h in np.ndindex(pos.shape[0], pos.shape[1], pos.shape[3]):
    occupied = [s for s in range(pos.shape[2]) if pos[l, b, s, h] >= 0]
    n = len(occupied)
    if n <= heavy + recent:
      keep = occupied
    else:
      older, newest = occupied[:n - recent], occupied[n - recent:]
      keep = sorted(top_by_score(older, scores[l, b, :, h])[:heavy]) + newest
    kept[(l, b, h)] = [int(pos[l, b, s, h]) for s in keep]
  return kept


def rule_tova(pos, scores, budget):
  kept = {}
  for l, b in np.ndindex(pos.shape[0], pos.shape[1]):
    occupied = [s for s in range(pos.shape[2]) if pos[l, b, s, 0] >= 0]
    mean_over_heads = scores[l, b].mean(axis=-1)
    keep = occupied if len(occupied) <= budget else sorted(top_by_score(occupied, mean_over_heads)[:budget])
    for h in range(pos.shape[3]):
      kept[(l, b, h)] = [int(pos[l, b, s, h]) for s in keep]
  return kept


def reference_pool(prefix, kernel, pooling):
  """F.avg_pool1d / F.max_pool1d(prefix, kernel, padding=kernel // 2, stride=1) for odd kernels."""
  half, n = kernel // 2, len(prefix)
  out = []
  for i in range(n):
    inside = [prefix[j] for j in range(i - half, i + half + 1) if 0 <= j < n]
    out.append(sum(inside) / kernel if pooling == "avg" else max(inside))
  return out


def reference_pyramid_budget(layer_idx, num_layers, capacity, window, beta, q_len):
  """KVCache-Factory PyramidKVCluster.update_kv: prefix tokens kept in `layer_idx`, None = no compression."""
  min_num = (capacity - window) // beta
  max_num = (capacity - window) * 2 - min_num
  if max_num >= q_len - window:
    max_num = q_len - window
    min_num = (capacity - window) * 2 - max_num
  steps = (max_num - min_num) // (num_layers - 1)
  if q_len < capacity:
    return None
  if q_len < (capacity - window) * 2:
    return capacity - window
  return max_num - layer_idx * steps


def rule_snapkv(pos, scores, capacity, window, kernel, pooling, budget_of_layer=None):
  """SnapKV on a prefilled cache (slot s holds position s); PyramidKV with `budget_of_layer(l, q_len)`."""
  kept = {}
  for l, b, h in np.ndindex(pos.shape[0], pos.shape[1], pos.shape[3]):
    q_len = int(np.sum(pos[l, b, :, h] >= 0))
    budget = capacity - window if q_len >= capacity else None
    if budget_of_layer is not None:
      budget = budget_of_layer(l, q_len)
    if budget is None:
      keep = list(range(q_len))
    else:
      prefix = q_len - window
      pooled = reference_pool(list(scores[l, b, :prefix, h]), kernel, pooling)
      keep = sorted(top_by_score(range(prefix), pooled)[:budget]) + list(range(prefix, q_len))
    kept[(l, b, h)] = [int(pos[l, b, s, h]) for s in keep]
  return kept


class TopkKeepPlanTest(parameterized.TestCase):

  @parameterized.parameters((True, "int", "tight"), (False, "int", "wide"), (True, "layer", "tight"),
                            (False, "layer", "wide"), (True, "layer_row", "wide"), (False, "layer_row", "tight"))
  def test_plan_matches_brute_force(self, ties, count_kind, out_kind):
    rng = np.random.RandomState(7)
    num_layers, batch, slots, kv = 3, 2, 13, 3
    counts = rng.randint(0, slots + 1, (num_layers, batch))
    valid = front_packed_positions(rng, num_layers, batch, slots, kv, counts) >= 0
    scores = random_scores(rng, valid.shape, ties).astype(np.float32)
    protected = rng.rand(*valid.shape) < 0.2
    per_plane = {"int": np.full((num_layers, batch), 4), "layer": np.array([[0] * batch, [3] * batch, [6] * batch]),
                 "layer_row": rng.randint(0, 8, (num_layers, batch))}[count_kind]
    keep_count = {"int": 4, "layer": per_plane[:, 0], "layer_row": per_plane}[count_kind]
    expected = {}
    for l, b, h in np.ndindex(num_layers, batch, kv):
      cand = [s for s in range(slots) if valid[l, b, s, h] and not protected[l, b, s, h]]
      chosen = top_by_score(cand, scores[l, b, :, h])[:per_plane[l, b]]
      always = [s for s in range(slots) if valid[l, b, s, h] and protected[l, b, s, h]]
      expected[(l, b, h)] = sorted(set(chosen) | set(always))
    # "tight": exactly as many output slots as the fullest head keeps; "wide": more than the input has.
    out = max(len(k) for k in expected.values()) if out_kind == "tight" else slots + 3
    src = np.asarray(plans.topk_keep_plan(jnp.asarray(scores), jnp.asarray(valid), keep_count,
                                           jnp.asarray(protected), out))
    self.assertEqual(src.shape, (num_layers, batch, out, kv))
    for (l, b, h), keep in expected.items():
      np.testing.assert_array_equal(src[l, b, :, h], keep + [-1] * (out - len(keep)), err_msg=str((l, b, h)))

  def test_ties_go_to_the_older_token(self):
    scores = jnp.ones((1, 1, 6, 1))
    valid = jnp.ones((1, 1, 6, 1), bool)
    src = plans.topk_keep_plan(scores, valid, 2, None, 6)
    np.testing.assert_array_equal(np.asarray(src)[0, 0, :, 0], [0, 1, -1, -1, -1, -1])

  def test_recent_mask_marks_the_newest_occupied_slots(self):
    valid = jnp.asarray([1, 1, 0, 1, 1, 1, 0, 0], bool)[None, None, :, None]
    np.testing.assert_array_equal(np.asarray(plans.recent_mask(valid, 3))[0, 0, :, 0],
                                  [0, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(plans.recent_mask(valid, 0)).sum(), 0)


class SyntheticRulesTest(parameterized.TestCase):
  """Each policy's `compact` on a hand-built cache equals the brute-force rule; k, v and scores move with pos."""

  def assert_cache_moved_with_pos(self, before, after, expected):
    pos_before, s_before = np.asarray(before.pos), np.asarray(before.scores)
    pos, k, v, s = (np.asarray(x) for x in (after.pos, after.k, after.v, after.scores))
    self.assertEqual(kept_positions(after), expected)
    for (l, b, h), keep in expected.items():
      n = len(keep)
      np.testing.assert_array_equal(k[l, b, :n, h, 0], keep)
      np.testing.assert_array_equal(v[l, b, :n, h, 1], np.asarray(keep) + 0.5)
      old_slot = [int(np.flatnonzero(pos_before[l, b, :, h] == p)[0]) for p in keep]
      np.testing.assert_array_equal(s[l, b, :n, h], s_before[l, b, old_slot, h])
      np.testing.assert_array_equal(s[l, b, n:, h], 0.0)
      np.testing.assert_array_equal(k[l, b, n:, h], 0.0)
    np.testing.assert_array_equal(np.asarray(after.length), np.max(np.sum(pos >= 0, axis=2), axis=-1))

  @parameterized.parameters((True, 3, 4, False), (False, 3, 4, True), (True, 0, 5, True), (False, 6, 0, False),
                            (True, 2, 1, True), (False, 2, 1, False))
  def test_h2o(self, ties, heavy, recent, resize):
    policy = H2OPolicy(heavy, recent)
    cfg, rng = tiny_cfg(), np.random.RandomState(1)
    slots = 11
    counts = rng.randint(0, slots + 1, (cfg.num_layers, 2))
    counts[0, 0], counts[1, 1] = heavy + recent, heavy + recent + 1  # at and just over the budget
    pos = front_packed_positions(rng, cfg.num_layers, 2, slots, cfg.num_kv_heads, counts)
    cache = synthetic_cache(policy, cfg, 2, slots, pos, random_scores(rng, pos.shape, ties))
    capacity = policy.budget + 1 if resize else None
    out = policy.compact(cache, capacity)
    self.assertEqual(out.capacity, capacity or slots)
    self.assert_cache_moved_with_pos(cache, out, rule_h2o(pos, np.asarray(cache.scores), heavy, recent))
    self.assertLessEqual(int(np.max(plans.occupancy(out))), policy.budget)

  @parameterized.parameters((True, 1), (False, 4), (True, 9))
  def test_tova_keeps_one_set_per_layer(self, ties, budget):
    policy = TOVAPolicy(budget)
    cfg, rng = tiny_cfg(), np.random.RandomState(2)
    slots = 12
    counts = rng.randint(0, slots + 1, (cfg.num_layers, 2))
    pos = front_packed_positions(rng, cfg.num_layers, 2, slots, cfg.num_kv_heads, counts, shared_heads=True)
    cache = synthetic_cache(policy, cfg, 2, slots, pos, random_scores(rng, pos.shape, ties))
    out = policy.compact(cache)
    self.assert_cache_moved_with_pos(cache, out, rule_tova(pos, np.asarray(cache.scores), budget))
    out_pos = np.asarray(out.pos)
    np.testing.assert_array_equal(out_pos, np.broadcast_to(out_pos[..., :1], out_pos.shape))  # shared by heads

  @parameterized.parameters(("avg", 1, True), ("avg", 3, False), ("avg", 5, True), ("max", 1, False),
                            ("max", 3, True), ("max", 5, False))
  def test_snapkv(self, pooling, kernel, ties):
    capacity, window = 9, 3
    policy = SnapKVPolicy(capacity, window, kernel, pooling, lean_decode=False)
    cfg, rng = tiny_cfg(), np.random.RandomState(3)
    slots = 17
    counts = np.array([[17, 9], [10, 5], [2, 14]])  # over, at, just over, under, under the window, over
    pos = np.where(np.arange(slots)[None, None, :, None] < counts[:, :, None, None],
                   np.arange(slots)[None, None, :, None], -1) * np.ones((1, 1, 1, cfg.num_kv_heads), np.int32)
    cache = synthetic_cache(policy, cfg, 2, slots, pos, random_scores(rng, pos.shape, ties))
    out = policy.compact(cache, 12)
    expected = rule_snapkv(pos, np.asarray(cache.scores), capacity, window, kernel, pooling)
    self.assert_cache_moved_with_pos(cache, out, expected)
    for (l, b, _), keep in expected.items():
      if counts[l, b] <= capacity:  # a prompt no longer than the capacity is left alone
        self.assertEqual(keep, list(range(counts[l, b])))

  def test_snapkv_is_a_no_op_for_short_prompts_and_during_decode(self):
    policy = SnapKVPolicy(16, 4, lean_decode=False)
    cfg, rng = tiny_cfg(), np.random.RandomState(4)
    pos = np.where(np.arange(20)[None, None, :, None] < 16, np.arange(20)[None, None, :, None], -1)
    pos = np.broadcast_to(pos, (cfg.num_layers, 2, 20, cfg.num_kv_heads))
    cache = synthetic_cache(policy, cfg, 2, 20, pos, rng.rand(*pos.shape))
    for out in (policy.compact(cache, 20), policy.compact(cache)):
      for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(out)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    self.assertIs(policy.compact(cache), cache)  # decode steps never pay for a plan

  @parameterized.product(pooling=["avg", "max"], ties=[True, False])
  def test_pyramidkv(self, pooling, ties):
    capacity, window, beta, kernel = 10, 2, 3, 3
    policy = PyramidKVPolicy(capacity, window, kernel, pooling, beta, lean_decode=False)
    cfg, rng = tiny_cfg(num_layers=4), np.random.RandomState(5)
    slots = 30
    lengths = np.array([30, 15, 9, 18])  # pyramid, middle (uniform), no-op, pyramid with a capped max
    batch = len(lengths)
    pos = np.where(np.arange(slots)[None, :, None] < lengths[:, None, None], np.arange(slots)[None, :, None], -1)
    pos = np.broadcast_to(pos[None], (cfg.num_layers, batch, slots, cfg.num_kv_heads))
    cache = synthetic_cache(policy, cfg, batch, slots, pos, random_scores(rng, pos.shape, ties))
    out = policy.compact(cache, policy.max_kept())
    budget = lambda l, q: reference_pyramid_budget(l, cfg.num_layers, capacity, window, beta, q)
    expected = rule_snapkv(pos, np.asarray(cache.scores), capacity, window, kernel, pooling, budget)
    self.assert_cache_moved_with_pos(cache, out, expected)
    held = np.asarray(plans.occupancy(out))[:, 0, 0]  # row 0: the pyramid, layer 0 largest
    self.assertEqual(held.tolist(), [budget(l, 30) + window for l in range(cfg.num_layers)])
    self.assertTrue(np.all(np.asarray(out.pos)[1:, 0, held[0]:] == -1))  # smaller layers leave empty slots


class PyramidBudgetTest(parameterized.TestCase):

  @parameterized.product(num_layers=[2, 5, 32], capacity_window=[(64, 8), (128, 32), (40, 32), (2048, 32)],
                         beta=[20, 3])
  def test_budgets_match_reference_linear_with_mean_cap_minus_window(self, num_layers, capacity_window, beta):
    capacity, window = capacity_window
    c = capacity - window
    prompt_lens = sorted({1, window, capacity - 1, capacity, capacity + 1, 2 * c - 1, 2 * c, 2 * c + window,
                          3 * c, 10 * capacity})
    got = np.asarray(pyramid_budgets(num_layers, capacity, window, beta, np.asarray(prompt_lens)))
    for j, q_len in enumerate(prompt_lens):
      ref = [reference_pyramid_budget(l, num_layers, capacity, window, beta, q_len) for l in range(num_layers)]
      if ref[0] is None:
        np.testing.assert_array_equal(got[:, j], max(q_len - window, 0))  # everything kept
        continue
      np.testing.assert_array_equal(got[:, j], ref)
      steps = np.diff(got[:, j])
      self.assertTrue(np.all(steps == steps[0]) and steps[0] <= 0)  # linear, layer 0 largest
      mean = got[:, j].mean()
      self.assertGreaterEqual(mean, c)  # mean = c + ((max - min) mod (L - 1)) / 2
      self.assertLess(mean, c + (num_layers - 1) / 2)
      if q_len >= 10 * capacity:  # uncapped: the reference's max and min
        self.assertEqual(got[0, j], 2 * c - c // beta)
        self.assertLess(got[-1, j] - c // beta, num_layers - 1)

  def test_policy_slots_hold_the_largest_layer_and_the_decode_tokens(self):
    cfg = tiny_cfg()
    policy = PyramidKVPolicy(64, 8, max_new_tokens=10)
    self.assertEqual(policy.max_kept(), 110 + 8)
    self.assertEqual(policy.decode_capacity(cfg, 1000), 128)
    self.assertEqual(policy.decode_capacity(cfg, 50), 50)
    self.assertEqual(SnapKVPolicy(64, 8, max_new_tokens=10).decode_capacity(cfg, 1000), 74)
    self.assertEqual(SnapKVPolicy(64, 8).decode_capacity(cfg, 1000), 1000)
    self.assertEqual(H2OPolicy(4, 8).decode_capacity(cfg, 1000), 13)
    self.assertEqual(TOVAPolicy(16).decode_capacity(cfg, 10), 10)


class H2OAccumulationTest(absltest.TestCase):

  def test_scores_are_carried_and_dropped_with_their_tokens_across_steps(self):
    """Simulated decode: each step appends a token and adds attention to every held token, then compacts."""
    heavy, recent = 3, 2
    policy = H2OPolicy(heavy, recent)
    cfg, rng = tiny_cfg(num_layers=2, num_kv_heads=2), np.random.RandomState(6)
    batch, slots = 2, policy.budget + 1
    cache = policy.init(cfg, batch, slots)
    compact = jax.jit(policy.compact)
    held = {key: {} for key in np.ndindex(cfg.num_layers, batch, cfg.num_kv_heads)}  # position -> score
    evicted = set()
    for t in range(14):
      pos, scores, length = np.array(cache.pos), np.array(cache.scores), np.array(cache.length)
      for l, b in np.ndindex(cfg.num_layers, batch):
        pos[l, b, length[l, b]] = t
      gain = rng.randint(1, 9, pos.shape) / 8.0 * (pos >= 0)
      scores += gain
      for (l, b, h), table in held.items():
        table[t] = 0.0
        for s in range(slots):
          if pos[l, b, s, h] >= 0:
            table[int(pos[l, b, s, h])] += gain[l, b, s, h]
      cache = synthetic_cache(policy, cfg, batch, slots, pos, scores)
      expected = rule_h2o(pos, scores, heavy, recent)
      cache = compact(cache)
      self.assertEqual(kept_positions(cache), expected)
      out_pos, out_scores = np.asarray(cache.pos), np.asarray(cache.scores)
      for (l, b, h), keep in expected.items():
        for gone in set(held[(l, b, h)]) - set(keep):
          del held[(l, b, h)][gone]
          evicted.add((l, b, h, gone))
        np.testing.assert_array_equal(out_scores[l, b, :len(keep), h], [held[(l, b, h)][p] for p in keep])
        self.assertTrue(all((l, b, h, p) not in evicted for p in out_pos[l, b, :, h] if p >= 0))
    self.assertGreater(len(evicted), 0)


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      (lambda: H2OPolicy(-1, 4), "H2O heavy=-1 must be >= 0"),
      (lambda: H2OPolicy(0, 0), r"heavy=0 \+ recent=0 must be >= 1"),
      (lambda: H2OPolicy(2, 2, score_agg="median"), "H2O score_agg='median' must be one of"),
      (lambda: TOVAPolicy(0), "TOVA budget=0 must be >= 1"),
      (lambda: TOVAPolicy(4, rope_mode="shifted"), "TOVA rope_mode='shifted' must be one of"),
      (lambda: SnapKVPolicy(32, 32), "SnapKV window=32 must be < capacity=32"),
      (lambda: SnapKVPolicy(64, kernel=4), "SnapKV kernel=4 must be odd"),
      (lambda: SnapKVPolicy(64, pooling="avgpool"), "SnapKV pooling='avgpool' must be one of"),
      (lambda: SnapKVPolicy(64.0), "SnapKV capacity=64.0 must be an integer"),
      (lambda: SnapKVPolicy(64, max_new_tokens=-1), "SnapKV max_new_tokens=-1 must be >= 0"),
      (lambda: PyramidKVPolicy(64, beta=0), "PyramidKV beta=0 must be >= 1"),
  )
  def test_errors_name_field_value_and_constraint(self, make, message):
    with self.assertRaisesRegex(ValueError, message):
      make()

  def test_cache_without_scores_is_rejected(self):
    cfg = tiny_cfg()
    cache = FullPolicy().init(cfg, 1, 8)
    with self.assertRaisesRegex(ValueError, "H2O needs a cache recording score_mode='accumulate'"):
      H2OPolicy(2, 2).compact(cache)

  def test_score_modes(self):
    self.assertEqual(H2OPolicy(1, 1).score_mode, "accumulate")
    self.assertEqual(TOVAPolicy(1).score_mode, "last")
    self.assertEqual(SnapKVPolicy(64, 16).score_mode, "window:16")
    self.assertEqual(PyramidKVPolicy(64, 8).score_mode, "window:8")
    self.assertEqual(H2OPolicy(1, 1).rope_mode, "original")
    self.assertEqual(H2OPolicy(1, 1, rope_mode="slot").init(tiny_cfg(), 1, 4).rope_mode, "slot")


# ----------------------------------------------------------------------------------------------------------------
# With a model.
# ----------------------------------------------------------------------------------------------------------------


_forward = jax.jit(llama.forward, static_argnames="cfg")


@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def _decode_step(params, cache, token, position, *, cfg, policy):
  logits, cache = llama.forward(params, token[:, None], position[:, None], cache, cfg)
  return logits[:, 0], policy.compact(cache)


def load_tiny_gqa():
  """The 3-layer, 4-query/2-kv-head random Llama of tests/hf_models, in lacax and (eager attention) in torch."""
  path, _ = hf_models.saved_model("llama_tied")
  cfg, params = hf.load_hf_checkpoint(path)
  torch_model = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
  return cfg, jax.tree.map(jnp.asarray, params), torch_model


def group_reduce(attn, agg, group):
  """[H, T, S] query-head attention -> [KV, T, S] with the group reduced per query."""
  h, t, s = attn.shape
  grouped = attn.reshape(h // group, group, t, s)
  return {"mean": grouped.mean(1), "max": grouped.max(1), "sum": grouped.sum(1)}[agg]


class ModelScoresTest(parameterized.TestCase):
  """Prefill + compaction on a real GQA model: the statistic each policy ranks by, computed from the attention
  weights of transformers (eager), selects the same tokens."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg, cls.params, model = load_tiny_gqa()
    rng = np.random.RandomState(11)
    cls.lengths = [40, 29]
    cls.prompts = [rng.randint(0, cls.cfg.vocab_size, n) for n in cls.lengths]
    cls.prefilled = {}
    cls.attn = []  # per row: [L, H, T, T] float64
    with torch.no_grad():
      for prompt in cls.prompts:
        out = model(torch.tensor(prompt[None]), output_attentions=True)
        cls.attn.append(np.stack([a[0].double().numpy() for a in out.attentions]))

  def prefill(self, policy, capacity):
    """(cache after the prompt forward, cache after the policy's prefill compaction)."""
    key = (policy.score_mode, policy.score_agg)
    if key not in self.prefilled:  # policies recording the same statistic share one forward
      cfg, width = self.cfg, max(self.lengths)
      tokens = np.zeros((len(self.prompts), width), np.int32)
      positions = np.full(tokens.shape, -1, np.int32)
      for b, p in enumerate(self.prompts):
        tokens[b, :len(p)], positions[b, :len(p)] = p, np.arange(len(p))
      cache = policy.init(cfg, len(self.prompts), width)
      _, self.prefilled[key] = _forward(self.params, jnp.asarray(tokens), jnp.asarray(positions), cache, cfg=cfg)
    full = self.prefilled[key]
    return full, policy.compact(full, capacity=capacity)

  def statistic(self, b, agg, queries):
    """[L, S, KV] attention received by each key from `queries` (a slice of query indices), lacax GQA order."""
    attn = self.attn[b]
    group = self.cfg.num_heads // self.cfg.num_kv_heads
    out = [group_reduce(attn[l], agg, group)[:, queries].sum(1).T for l in range(attn.shape[0])]
    return np.stack(out)

  def assert_recorded(self, cache, agg, queries_of_row):
    for b, n in enumerate(self.lengths):
      want = self.statistic(b, agg, queries_of_row(n))
      np.testing.assert_allclose(np.asarray(cache.scores)[:, b, :n], want, atol=2e-5, rtol=1e-5)

  @parameterized.parameters("mean", "max", "sum")
  def test_h2o(self, agg):
    policy = H2OPolicy(6, 5, score_agg=agg)
    full, out = self.prefill(policy, policy.budget + 1)
    self.assert_recorded(full, agg, lambda n: slice(0, n))
    scores = self.layout(lambda b, n: self.statistic(b, agg, slice(0, n)))
    self.assertEqual(kept_positions(out), rule_h2o(np.asarray(full.pos), scores, 6, 5))

  @parameterized.parameters("mean", "max")
  def test_tova(self, agg):
    policy = TOVAPolicy(13, score_agg=agg)
    full, out = self.prefill(policy, 14)
    self.assert_recorded(full, agg, lambda n: slice(n - 1, n))
    scores = self.layout(lambda b, n: self.statistic(b, agg, slice(n - 1, n)))
    if agg == "mean":  # the reference's statistic: the last query's attention averaged over all query heads
      for b, n in enumerate(self.lengths):
        np.testing.assert_allclose(scores[:, b, :n].mean(-1), self.attn[b][:, :, n - 1, :n].mean(1), atol=1e-12)
    expected = rule_tova(np.asarray(full.pos), scores, 13)
    self.assertEqual(kept_positions(out), expected)

  @parameterized.parameters(("mean", "avg"), ("max", "max"), ("sum", "max"), ("mean", "max"))
  def test_snapkv(self, agg, pooling):
    policy = SnapKVPolicy(20, 6, 5, pooling, score_agg=agg)
    full, out = self.prefill(policy, 24)
    self.assert_recorded(full, agg, lambda n: slice(n - 6, n))
    scores = self.layout(lambda b, n: self.statistic(b, agg, slice(n - 6, n)))
    self.assertEqual(kept_positions(out), rule_snapkv(np.asarray(full.pos), scores, 20, 6, 5, pooling))

  def test_pyramidkv(self):
    policy = PyramidKVPolicy(12, 4, 3, "max", beta=4)
    full, out = self.prefill(policy, policy.max_kept())
    scores = self.layout(lambda b, n: self.statistic(b, "mean", slice(n - 4, n)))
    budget = lambda l, q: reference_pyramid_budget(l, self.cfg.num_layers, 12, 4, 4, q)
    self.assertEqual(kept_positions(out), rule_snapkv(np.asarray(full.pos), scores, 12, 4, 3, "max", budget))

  def layout(self, row_statistic):
    """[L, B, S, KV] float64 cache-layout scores from a per-row [L, n, KV] statistic (0 past the prompt)."""
    cfg, width = self.cfg, max(self.lengths)
    out = np.zeros((cfg.num_layers, len(self.lengths), width, cfg.num_kv_heads))
    for b, n in enumerate(self.lengths):
      out[:, b, :n] = row_statistic(b, n)
    return out


POLICIES = {
    "h2o": H2OPolicy(5, 6),
    "tova": TOVAPolicy(11),
    "snapkv": SnapKVPolicy(12, 4, 3, max_new_tokens=9),
    "pyramidkv": PyramidKVPolicy(12, 4, 3, "max", beta=4, max_new_tokens=9),
}
NEVER_EVICTING = {
    "h2o": H2OPolicy(40, 40),
    "h2o_slot_rope": H2OPolicy(40, 40, rope_mode="slot"),
    "h2o_post_rope_keys": H2OPolicy(40, 40, rope_mode="stored"),
    "tova": TOVAPolicy(80),
    "snapkv": SnapKVPolicy(64, 4),
    "pyramidkv": PyramidKVPolicy(64, 4, max_new_tokens=9),
}


def greedy_run(params, cfg, prompts, policy, max_new_tokens):
  """`generate.prefill`, then greedy decode steps from the host: tokens, step logits, caches after compaction."""
  tokens, lengths = generation.pad_prompts(prompts, bucket=8)
  total = int(lengths.max()) + max_new_tokens
  statics = dict(cfg=cfg, policy=policy, sampling=generation.SamplingConfig(), max_new_tokens=max_new_tokens,
                 stop_ids=())
  state = generation.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0),
                             decode_capacity=policy.decode_capacity(cfg, total), **statics)

  cache, token, position = state.cache, state.token, state.position
  out, logits, caches = [token], [], [cache]
  for _ in range(max_new_tokens - 1):
    step_logits, cache = _decode_step(params, cache, token, position, cfg=cfg, policy=policy)
    token, position = jnp.argmax(step_logits, axis=-1).astype(jnp.int32), position + 1
    out.append(token)
    logits.append(step_logits)
    caches.append(cache)
  return np.stack(out, axis=1), np.stack(logits, axis=1), caches


def stepped_generate(params, cfg, prompts, policy, max_new_tokens):
  """`lacax.generate`'s own compiled prefill and decode loop, driven one decode step at a time.

  Returns the generated tokens [B, max_new_tokens] and, after the prefill and after every decode step, the
  positions [L, B, S, KV] the cache holds.
  """
  tokens, lengths = generation.pad_prompts(prompts, bucket=8)
  statics = dict(cfg=cfg, policy=policy, sampling=generation.SamplingConfig(), max_new_tokens=max_new_tokens,
                 stop_ids=())
  decode_capacity = policy.decode_capacity(cfg, int(lengths.max()) + max_new_tokens)
  state = generation.prefill(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0),
                             decode_capacity=decode_capacity, **statics)
  out, pos = [np.array(state.token)], [np.array(state.cache.pos)]
  for _ in range(max_new_tokens - 1):
    # The loop runs while step < max_new_tokens: from the last step it makes exactly one iteration.
    state = generation.decode(params, state.replace(step=jnp.int32(max_new_tokens - 1)), pad_id=0, **statics)
    out.append(np.array(state.token))
    pos.append(np.array(state.cache.pos))  # a copy: `decode` donates the state it is given
  return np.stack(out, axis=1), pos


class GenerateTest(parameterized.TestCase):

  max_new = 8

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg, cls.params, _ = load_tiny_gqa()
    rng = np.random.RandomState(12)
    cls.prompts = [rng.randint(0, cls.cfg.vocab_size, n).tolist() for n in (23, 15)]
    cls.full = greedy_run(cls.params, cls.cfg, cls.prompts, FullPolicy(), cls.max_new)

  @parameterized.named_parameters(POLICIES.items())
  def test_generate_stays_within_budget(self, policy):
    tokens, positions = stepped_generate(self.params, self.cfg, self.prompts, policy, self.max_new)
    result = generation.generate(self.params, self.cfg, self.prompts, max_new_tokens=self.max_new, policy=policy,
                                 bucket=8)
    self.assertEqual(result.tokens, tokens.tolist())
    lengths = np.array([len(p) for p in self.prompts])
    for step, pos in enumerate(positions):
      held = np.sum(pos >= 0, axis=2)  # [L, B, KV]
      # Every kv head holds as many tokens.
      np.testing.assert_array_equal(held, np.broadcast_to(held[..., :1], held.shape))
      if isinstance(policy, (H2OPolicy, TOVAPolicy)):
        limit = np.full(held.shape[:2], policy.budget)
      else:  # prompt compressed to its budget once; then one slot per decode step
        budget = np.asarray(policy.prefix_budget(self.cfg.num_layers, jnp.asarray(lengths)))
        limit = np.minimum(np.broadcast_to(budget.reshape(budget.shape[0], -1), held.shape[:2]) + policy.window,
                           lengths) + step
      np.testing.assert_array_equal(held[..., 0], np.minimum(lengths + step, limit), err_msg=f"step {step}")
      if isinstance(policy, TOVAPolicy):
        np.testing.assert_array_equal(pos, np.broadcast_to(pos[..., :1], pos.shape))

  @parameterized.named_parameters(NEVER_EVICTING.items())
  def test_budget_that_never_evicts_equals_the_full_cache(self, policy):
    tokens, logits, caches = greedy_run(self.params, self.cfg, self.prompts, policy, self.max_new)
    full_tokens, full_logits, full_caches = self.full
    np.testing.assert_array_equal(tokens, full_tokens)
    np.testing.assert_allclose(logits, full_logits, atol=1e-5, rtol=0)
    self.assertEqual(caches[-1].capacity, full_caches[-1].capacity)  # sized for the whole run, no more
    np.testing.assert_array_equal(np.asarray(caches[-1].pos), np.asarray(full_caches[-1].pos))

  @parameterized.named_parameters(("h2o", H2OPolicy(5, 6, rope_mode="stored")),
                                  ("snapkv", SnapKVPolicy(12, 4, 3, max_new_tokens=9, rope_mode="stored")))
  def test_post_rope_keys_evict_and_read_like_original_positions(self, policy):
    """Keys cached rotated ("stored") move through compaction with their rotation: same run as "original"."""
    original = dataclasses.replace(policy, rope_mode="original")
    tokens, logits, caches = greedy_run(self.params, self.cfg, self.prompts, policy, self.max_new)
    want_tokens, want_logits, want_caches = greedy_run(self.params, self.cfg, self.prompts, original, self.max_new)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)
    for got, want in zip(caches, want_caches):
      np.testing.assert_array_equal(np.asarray(got.pos), np.asarray(want.pos))
    self.assertLess(int(np.sum(np.asarray(caches[-1].pos) >= 0, axis=2).max()), 23 + self.max_new)  # it evicted

  def test_key_merging_and_position_shifting_policies_refuse_post_rope_keys(self):
    for make in (lambda: StreamingPolicy(4, 8, rope_mode="stored"),
                 lambda: KVMergerPolicy(budget=8, rope_mode="stored")):
      with self.assertRaisesRegex(ValueError, "rope_mode='stored'"):
        make()


if __name__ == "__main__":
  absltest.main()
