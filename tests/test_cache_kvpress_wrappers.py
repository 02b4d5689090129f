"""kvpress's CriticalAdaKV, Block and Finch presses as lacax policies, against their definitions restated in NumPy
from the model's own numbers (the cache's keys and values, the weights, the residual stream) after a real
prefill of the tiny random GQA model of tests/test_cache_recorded_methods.py (4 query heads on 2 kv heads, two
rows of different lengths). Parity with kvpress itself is tests/test_kvpress_parity.py; the registry-level
invariants are tests/test_cache_contract.py.
"""

from __future__ import annotations

from absl.testing import absltest, parameterized
import jax
import numpy as np

from lacax.cache.block import BlockPolicy
from lacax.cache.criticaladakv import CriticalAdaKVPolicy
from lacax.cache.finch import FinchPolicy
from lacax.cache.keydiff import KeyDiffPolicy
from lacax.cache.knorm import KnormPolicy
from tests.cache_policies import kept_positions, top_budget
from lacax.cache import plans
from tests.test_cache_recorded_methods import (BUDGET, CFG, G, LENGTHS, handoff, model, np_queries, np_rope,
                                               post_rope_keys)


def np_value_norms(v: np.ndarray) -> np.ndarray:
  """[L, B, S, KV] ||W_o v||_1 per query head, averaged over the group (kvpress `CriticalKVPress.vwl1norm`)."""
  layers = jax.tree.map(lambda a: np.asarray(a, np.float64), model()["layers"])
  wo = layers["wo"].reshape(CFG.num_layers, CFG.num_kv_heads, G, CFG.head_dim, -1)
  return np.abs(np.einsum("lbskd,lkgde->lbskge", v, wo)).sum(-1).mean(-1)


class CriticalAdaKVTest(parameterized.TestCase):

  @parameterized.named_parameters(("_default", 0.2, 0.5), ("_no_safeguard", 0.0, 0.3), ("_all_first", 0.5, 1.0))
  def test_kept_positions_equal_numpy(self, alpha, ratio):
    policy = CriticalAdaKVPolicy(KnormPolicy(BUDGET), BUDGET, alpha_safeguard=alpha, first_stage_ratio=ratio)
    before, after = handoff(policy)
    k, v = np.asarray(before.k, np.float64), np.asarray(before.v, np.float64)
    vwl1 = np_value_norms(v)
    kept = kept_positions(after)
    KV = CFG.num_kv_heads
    n_safe = max(1, int(BUDGET * alpha)) if alpha > 0 else 0
    for l in range(CFG.num_layers):
      for b, n in enumerate(LENGTHS):
        score = -np.linalg.norm(k[l, b, :n], axis=-1).T  # [KV, n], KnormPress.score
        forced = np.zeros_like(score, bool)
        for h in range(KV):
          forced[h, top_budget(score[h], n_safe)] = True
        # AdaKV's allocation: the layer's KV * BUDGET best of the forced-first scores, slot-major.
        flat = np.where(forced, np.inf, score).T.reshape(-1)
        chosen = np.argsort(-flat, kind="stable")[:KV * BUDGET]
        head_budget = np.bincount(chosen % KV, minlength=KV)
        self.assertEqual(head_budget.sum(), KV * BUDGET)
        for h in range(KV):
          first = top_budget(np.where(forced[h], np.inf, score[h]), int(head_budget[h] * ratio))  # stage 1
          merged = (score[h] + 1e-4) * vwl1[l, b, :n, h]  # stage 2
          merged[first] = np.inf
          merged[forced[h]] = np.inf
          want = top_budget(merged, int(head_budget[h]))
          self.assertEqual(kept[(l, b, h)], want, f"layer {l} row {b} kv head {h}")
    budgets = {len(p) for p in kept.values()}
    self.assertGreater(len(budgets), 1, "the heads' budgets are all equal: the allocation adapted nothing")

  def test_rejects_bad_fields(self):
    with self.assertRaisesRegex(ValueError, r"CriticalAdaKV alpha_safeguard=1.5 must be a number in \[0, 1\]"):
      CriticalAdaKVPolicy(KnormPolicy(BUDGET), BUDGET, alpha_safeguard=1.5)
    with self.assertRaisesRegex(ValueError, r"CriticalAdaKV first_stage_ratio=-0.1 must be a number in \[0, 1\]"):
      CriticalAdaKVPolicy(KnormPolicy(BUDGET), BUDGET, first_stage_ratio=-0.1)
    with self.assertRaisesRegex(ValueError, r"CriticalAdaKV budget=0 must be >= 1"):
      CriticalAdaKVPolicy(KnormPolicy(BUDGET), 0)


def np_keydiff(keys: np.ndarray) -> np.ndarray:
  """[n, D] -> [n] kvpress `KeyDiffPress.score`: -cos(k, mean of the normalised keys)."""
  anchor = (keys / np.linalg.norm(keys, axis=-1, keepdims=True)).mean(0)
  return -(keys @ anchor) / (np.linalg.norm(keys, axis=-1) * np.linalg.norm(anchor))


class BlockTest(parameterized.TestCase):

  @parameterized.named_parameters(("_block3", 3), ("_block4", 4), ("_one_block", 64))
  def test_kept_positions_equal_numpy(self, block_size):
    """kvpress `BlockPress.compress` over KeyDiff: the first n tokens, then each block re-scored with the kept
    ones (KeyDiff's anchor is the mean of exactly those keys) and the n best kept."""
    policy = BlockPolicy(KeyDiffPolicy(BUDGET), BUDGET, block_size=block_size)
    before, after = handoff(policy, capacity=BUDGET)
    self.assertEqual(after.capacity, BUDGET)
    keys = post_rope_keys(before)
    whole_prompt_differs = False
    for (l, b, h), kept in kept_positions(after).items():
      n = LENGTHS[b]
      want = list(range(BUDGET))
      for start in range(BUDGET, n, block_size):
        current = want + list(range(start, min(start + block_size, n)))
        score = np_keydiff(keys[l, b, current, h])
        want = sorted(current[i] for i in top_budget(score, BUDGET))
      self.assertEqual(kept, want, f"layer {l} row {b} kv head {h}")
      whole_prompt_differs |= want != top_budget(np_keydiff(keys[l, b, :n, h]), BUDGET)
    if block_size < 64:  # the blocks change what is kept: KeyDiff's anchor depends on the set it scores
      self.assertTrue(whole_prompt_differs, "block-wise selection kept KeyDiff's whole-prompt top-n everywhere")

  def test_position_free_scorer_keeps_its_top_budget(self):
    """Over Knorm (a token's score is its own key's norm) the blocks keep the whole prompt's top n."""
    _, after = handoff(BlockPolicy(KnormPolicy(BUDGET), BUDGET, block_size=3), capacity=BUDGET)
    _, want = handoff(KnormPolicy(BUDGET), capacity=BUDGET)
    self.assertEqual(kept_positions(after), kept_positions(want))

  def test_rejects_bad_fields(self):
    with self.assertRaisesRegex(ValueError, r"Block block_size=0 must be >= 1"):
      BlockPolicy(KnormPolicy(BUDGET), BUDGET, block_size=0)
    with self.assertRaisesRegex(ValueError, r"Block inner=FullPolicy must be a scorer policy"):
      from lacax.cache.full import FullPolicy  # pylint: disable=g-import-not-at-top
      BlockPolicy(FullPolicy(), BUDGET)


def np_finch_scores(before, l: int, b: int, h: int, window: int, normalize: bool) -> np.ndarray:
  """[n] kvpress `FinchPress.score` of row b's n-token prompt: the last `window` queries' causal attention
  over the prompt, cut to the context, each row times its query index (normalize_scores), averaged over the
  window and the kv head's group; the window padded with max + 1."""
  n = LENGTHS[b]
  t = np.arange(n - window, n)
  q = np_rope(np_queries()[l, b, n - window:n, h * G:(h + 1) * G], t[:, None])  # [w, G, D]
  k = post_rope_keys(before)[l, b, :n, h]  # [n, D]
  logits = np.einsum("wgd,sd->gws", q, k) / np.sqrt(CFG.head_dim)
  logits = np.where(np.arange(n)[None, None, :] <= t[None, :, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True))[..., :n - window]
  if normalize:
    probs = probs * t[None, :, None]
  scores = probs.mean(1).mean(0)
  return np.concatenate([scores, np.full(window, scores.max() + 1)])


class FinchTest(parameterized.TestCase):

  @parameterized.named_parameters(("_normalized", True, 4), ("_plain", False, 4), ("_window6", True, 6))
  def test_kept_positions_equal_numpy(self, normalize, window):
    policy = FinchPolicy(BUDGET, window=window, normalize_scores=normalize)
    before, after = handoff(policy, capacity=BUDGET)
    self.assertEqual(after.capacity, BUDGET)
    for (l, b, h), kept in kept_positions(after).items():
      want = top_budget(np_finch_scores(before, l, b, h, window, normalize), BUDGET)
      self.assertEqual(kept, want, f"layer {l} row {b} kv head {h}")
      self.assertContainsSubset(range(LENGTHS[b] - window, LENGTHS[b]), kept)

  @parameterized.named_parameters(("_normalized", True), ("_plain", False))
  def test_recorded_statistic_is_the_window_sum(self, normalize):
    """The forward's `window_by_position` statistic is w times kvpress's score at every context slot (the
    position weights applied per query row, before the sum over the window)."""
    window = 4
    before, _ = handoff(FinchPolicy(BUDGET, window=window, normalize_scores=normalize), capacity=BUDGET)
    recorded = np.asarray(before.scores, np.float64)
    for l in range(CFG.num_layers):
      for b, n in enumerate(LENGTHS):
        for h in range(CFG.num_kv_heads):
          want = window * np_finch_scores(before, l, b, h, window, normalize)[:n - window]
          np.testing.assert_allclose(recorded[l, b, :n - window, h], want, rtol=2e-5, atol=1e-7)

  def test_chunked_selection_equals_numpy(self):
    """kvpress's chunk_length: every chunk of the prompt (window included) keeps its own share."""
    chunk = 8
    policy = FinchPolicy(BUDGET, window=4, chunk_length=chunk)
    before, after = handoff(policy)
    for (l, b, h), kept in kept_positions(after).items():
      n = LENGTHS[b]
      scores = np_finch_scores(before, l, b, h, 4, True)
      want = []
      for c, count in enumerate(plans.chunk_counts(n, BUDGET, chunk)):
        want += [c * chunk + i for i in top_budget(scores[c * chunk:(c + 1) * chunk], int(count))]
      self.assertEqual(kept, sorted(want), f"layer {l} row {b} kv head {h}")
    self.assertEqual(int(policy.max_held(CFG, 22)[0]), int(plans.chunk_counts(22, BUDGET, chunk).sum()))

  def test_chunked_prompts_kvpress_refuses_are_refused(self):
    """kvpress asserts chunk_length > window / (1 - r): with 1 - r = capacity / P, chunk_length * capacity >
    window * P. Sizing a run for such prompts is refused, naming the fields; a prompt within the budget, or a
    chunk long enough, passes."""
    policy = FinchPolicy(BUDGET, window=4, chunk_length=8)  # 8 * 10 > 4 * P for P < 20
    self.assertEqual(policy.run_capacity(CFG, 19, 3), policy.max_kept() + 3)
    policy.check_chunks(BUDGET)  # nothing is compressed
    with self.assertRaisesRegex(ValueError, r"Finch chunk_length=8 must be > window / \(1 - r\) .* 4 \* 20 / 10"):
      policy.run_capacity(CFG, 20, 3)
    FinchPolicy(BUDGET, window=4).check_chunks(1000)  # unchunked: no condition

  def test_rejects_bad_fields(self):
    with self.assertRaisesRegex(ValueError, r"Finch window=10 must be < capacity=10"):
      FinchPolicy(BUDGET, window=BUDGET)
    with self.assertRaisesRegex(ValueError, r"Finch chunk_length=0 must be >= 1"):
      FinchPolicy(BUDGET, window=4, chunk_length=0)
    with self.assertRaisesRegex(ValueError, r"Finch normalize_scores=1 must be True or False"):
      FinchPolicy(BUDGET, window=4, normalize_scores=1)


if __name__ == "__main__":
  absltest.main()
