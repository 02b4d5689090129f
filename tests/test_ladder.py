"""LaCache ladder planner: reference parity (golden + literal oracle), config validation and invariants.

Golden data (`tests/golden/lacache/`) comes from the index arithmetic of GATECH-EIC/LaCache@0f27c33, run by
`tests/golden/lacache/generate.py` with the reference checked out by path; see its README. Numbers asserted
below are what that reference produces; where a second-hand description of LaCache (a paper summary, or a
hand restatement of the reference's arithmetic) states something else, the test says so.
"""

import collections
import functools
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from lacax.cache import ladder
from lacax.cache.ladder import LadderConfig

_GOLDEN_PATH = os.path.join(os.path.dirname(__file__), "golden", "lacache", "kept_positions.json")
with open(_GOLDEN_PATH) as f:
  _GOLDEN = json.load(f)
_CASES = {case["name"]: case for case in _GOLDEN["streaming"] + _GOLDEN["oneshot"]}


def _config(case, layer_mapping="modular"):
  if "protocol" in case:
    return LadderConfig.for_prefill(case["num_layers"], case["span"], case["overlap"], case["budget"],
                                    case["prefill_len"], case["model_max_len"], case["protocol"], layer_mapping)
  return LadderConfig(case["num_layers"], case["span"], case["overlap"], case["cache_size"], case["start_size"],
                      layer_mapping)


def _golden_kept(checkpoint):
  rows = [np.cumsum(row) for row in checkpoint["rows_delta"]]
  return np.stack([rows[r] for r in checkpoint["layer_row"]])


@functools.lru_cache(maxsize=None)
def _trace(name, layer_mapping="modular"):
  """The jnp planner's trace of a golden case, at the golden checkpoints (cached: several tests read it)."""
  case = _CASES[name]
  return ladder.simulate_ladder(_config(case, layer_mapping), case["num_tokens"],
                                [c["tokens"] for c in case["checkpoints"]], prefill_len=case["prefill_len"])


def _state_dict(state):
  return dict(cursor=int(state.cursor), compacted=bool(state.compacted), cache_size=int(state.cache_size))


def _modular_phase(cfg):
  return np.arange(cfg.num_layers) % (cfg.R + 1)


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      # (N, S, O) -> (B, A, R) from the reference's formulas.
      (32, 16, 0, 2, 1, 1),
      (32, 9, 3, 5, 2, 3),
      (24, 9, 7, 9, 5, 4),
      (28, 14, 0, 2, 1, 1),
      (32, 8, 4, 7, 2, 5),
  )
  def test_group_constants(self, n, span, overlap, b, a, r):
    cfg = LadderConfig(num_layers=n, span=span, overlap=overlap, cache_size=1024, start_size=4)
    self.assertEqual((cfg.B, cfg.A, cfg.R), (b, a, r))
    self.assertEqual(cfg.compensation, r // 2)

  @parameterized.named_parameters(
      ("span_equals_layers", dict(num_layers=16, span=16, overlap=0, cache_size=256), r"LadderConfig\.span=16 "),
      ("span_above_layers", dict(num_layers=8, span=9, overlap=0, cache_size=256), r"LadderConfig\.span=9 "),
      ("overlap_equals_span", dict(num_layers=32, span=8, overlap=8, cache_size=256), r"LadderConfig\.overlap=8 "),
      ("negative_overlap", dict(num_layers=32, span=8, overlap=-1, cache_size=256), r"LadderConfig\.overlap=-1 "),
      # S < N but B = 1 + ceil(4/4) = 2 = A = min(ceil(8/4), 2): nothing to remove, the reference divides by 0.
      ("zero_reduction", dict(num_layers=12, span=8, overlap=4, cache_size=256), r"LadderConfig\.overlap=4 .*R"),
      ("zero_layers", dict(num_layers=0, span=1, overlap=0, cache_size=256), r"LadderConfig\.num_layers=0 "),
      ("zero_cache", dict(num_layers=32, span=16, overlap=0, cache_size=0), r"LadderConfig\.cache_size=0 "),
      ("zero_sinks", dict(num_layers=32, span=16, overlap=0, cache_size=256, start_size=0),
       r"LadderConfig\.start_size=0 "),
      # 4 sinks + 32 reserve + A=1 - floor(1/2) = 37.
      ("cache_too_small", dict(num_layers=32, span=16, overlap=0, cache_size=36), r"LadderConfig\.cache_size=36 .*37"),
      ("bad_mapping", dict(num_layers=32, span=16, overlap=0, cache_size=256, layer_mapping="blocks"),
       r"LadderConfig\.layer_mapping='blocks'"),
      ("float_span", dict(num_layers=32, span=16.0, overlap=0, cache_size=256), r"LadderConfig\.span=16\.0 "),
  )
  def test_invalid_config_names_field(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      LadderConfig(**kwargs)

  @parameterized.parameters((32, 16, 0, 4), (32, 8, 4, 4), (24, 9, 7, 1), (8, 3, 1, 1))
  def test_smallest_cache_runs_and_one_less_is_rejected(self, n, span, overlap, sinks):
    probe = LadderConfig(n, span, overlap, 4096, sinks)
    smallest = sinks + n + probe.A - probe.compensation
    with self.assertRaisesRegex(ValueError, r"LadderConfig\.cache_size"):
      LadderConfig(n, span, overlap, smallest - 1, sinks)
    # At the boundary the reference runs (no division by zero, no stray index) for many startovers.
    cfg = LadderConfig(n, span, overlap, smallest, sinks)
    state = dict(cursor=sinks, compacted=False, cache_size=smallest)
    length = 0
    for _ in range(4 * smallest):
      plan, state = ladder.reference_plan(cfg, state, length + 1)
      length = len(plan[0])
    self.assertLessEqual(length, smallest + cfg.compensation)

  @parameterized.named_parameters(
      # LongBench/pred.py: C = int(budget * model2maxlen), s = min(128, max(1, P - (N+1)), C - (N+1)).
      ("llama2_half", 32, 16, 0, 0.5, 3500, 3500, "longbench", 1750, 128),
      ("llama2_quarter", 32, 9, 3, 0.25, 3500, 3500, "longbench", 875, 128),
      ("smollm2_quarter", 24, 9, 7, 0.25, 7000, 7500, "longbench", 1875, 128),
      ("short_prompt_sinks", 32, 16, 0, 0.5, 100, 3500, "longbench", 1750, 67),
      ("small_budget_sinks", 32, 16, 0, 0.04, 3500, 3500, "longbench", 140, 107),
      # niah/pred.py: C = int(budget * prompt_len), s = 64.
      ("niah", 28, 14, 0, 0.5, 4001, None, "niah", 2000, 64),
  )
  def test_for_prefill(self, n, span, overlap, budget, prompt_len, max_len, protocol, cache_size, start_size):
    cfg = LadderConfig.for_prefill(n, span, overlap, budget, prompt_len, max_len, protocol)
    self.assertEqual((cfg.cache_size, cfg.start_size), (cache_size, start_size))

  def test_for_prefill_errors(self):
    with self.assertRaisesRegex(ValueError, r"model_max_len=None"):
      LadderConfig.for_prefill(32, 16, 0, 0.5, 3500)
    with self.assertRaisesRegex(ValueError, r"protocol='ruler'"):
      LadderConfig.for_prefill(32, 16, 0, 0.5, 3500, 3500, protocol="ruler")
    with self.assertRaisesRegex(ValueError, r"budget=0"):
      LadderConfig.for_prefill(32, 16, 0, 0, 3500, 3500)
    # C = int(0.009 * 3500) = 31 leaves start_size = C - (N+1) = -2.
    with self.assertRaisesRegex(ValueError, r"LadderConfig\.start_size=-2 "):
      LadderConfig.for_prefill(32, 16, 0, 0.009, 3500, 3500)
    # 29 startover passes; the reference's re-ladder indexes slot 1943 of 1940 and raises IndexError.
    with self.assertRaisesRegex(ValueError, r"prompt_len=2000 .*1943 of 1940"):
      LadderConfig.for_prefill(32, 9, 3, 0.1, 2000, 2000)
    LadderConfig.for_prefill(32, 9, 3, 0.1, 1900, 2000)  # 28 passes still fit.

  def test_check_compaction_agrees_with_literal_reference(self):
    cfg = LadderConfig(32, 9, 3, 200, 128)
    state = _state_dict(ladder.init_ladder_state(cfg))
    ladder.reference_plan(cfg, state, 1900)
    ladder.check_compaction(cfg, state, 1900)
    with self.assertRaises(IndexError):
      ladder.reference_plan(cfg, state, 2000)
    with self.assertRaisesRegex(ValueError, "IndexError"):
      ladder.check_compaction(cfg, state, 2000)


class GoldenTest(parameterized.TestCase):

  @parameterized.named_parameters((name, name) for name in _CASES)
  def test_kept_positions_match_reference(self, name):
    case = _CASES[name]
    cfg = _config(case)
    self.assertEqual((cfg.cache_size, cfg.start_size, cfg.B, cfg.A, cfg.R),
                     (case["cache_size"], case["start_size"], case["B"], case["A"], case["R"]))
    trace = _trace(name)
    for checkpoint in case["checkpoints"]:
      tokens = checkpoint["tokens"]
      np.testing.assert_array_equal(trace.kept[tokens], _golden_kept(checkpoint), err_msg=f"{name} @ {tokens}")
      call = tokens - case["prefill_len"]
      self.assertEqual(_state_dict(jax.tree.map(lambda x: x[call], trace.states)),
                       dict(cursor=checkpoint["cursor"], compacted=checkpoint["compacted"],
                            cache_size=checkpoint["cache_size_state"]), msg=f"{name} @ {tokens}")

  def test_worked_example_o0(self):
    # Worked example N=8, S=4, O=0, C=16, s=4 ("after token t" = t + 1 tokens). Even layers agree, odd layers agree.
    table = {
        16: (5, [4, *range(6, 17)], [5, *range(6, 17)]),
        19: (8, [4, 6, 8, 10, *range(12, 20)], [5, 7, 9, 11, *range(12, 20)]),
        20: (5, [4, 8, 10, *range(12, 21)], [7, 9, 11, *range(12, 21)]),
        23: (8, [4, 8, 12, 14, *range(16, 24)], [7, 11, 13, 15, *range(16, 24)]),
        24: (5, [4, 12, 14, *range(16, 25)], [11, 13, 15, *range(16, 25)]),
        39: (8, [4, 24, 28, 30, *range(32, 40)], [23, 27, 29, 31, *range(32, 40)]),
    }
    trace = _trace("spec_1_2_N8_S4_O0_C16")
    for token, (cursor, even, odd) in table.items():
      kept = trace.kept[token + 1]
      self.assertEqual(int(trace.states.cursor[token]), cursor)
      for layer in range(8):
        np.testing.assert_array_equal(kept[layer], [0, 1, 2, 3] + (odd if layer % 2 else even))

  def test_worked_example_o2(self):
    kept = _trace("spec_1_2_N8_S4_O2_C24").kept[28]
    even = [*range(6), 7, 8, 10, 11, 13, 14, *range(16, 28)]
    odd = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, *range(16, 28)]
    for layer in range(8):
      np.testing.assert_array_equal(kept[layer], odd if layer % 2 else even)


class LiteralReferenceParityTest(parameterized.TestCase):
  """The jnp planner's src_index equals the literal list reference, call by call, on random configurations."""

  @parameterized.parameters(range(10))
  def test_random_configs(self, seed):
    rng = random.Random(seed)
    while True:
      n = rng.randint(2, 20)
      span = rng.randint(1, n - 1)
      overlap = rng.randint(0, span - 1)
      sinks = rng.choice([1, 2, 4, 8])
      try:
        cfg = LadderConfig(n, span, overlap, sinks + n + rng.randint(0, 60), sinks,
                           rng.choice(ladder.LAYER_MAPPINGS))
        prefill = rng.choice([1, rng.randint(1, 12 * cfg.cache_size)])
        ladder.check_compaction(cfg, ladder.init_ladder_state(cfg), prefill)
        break
      except ValueError:
        continue
    capacity = max(prefill, cfg.stream_capacity)
    state, oracle_state = ladder.init_ladder_state(cfg), _state_dict(ladder.init_ladder_state(cfg))
    positions = np.tile(np.arange(prefill), (n, 1))  # [N, L]: original token of every slot
    num_calls = 2 * cfg.cache_size + 40
    for call in range(num_calls):
      length = positions.shape[1]
      plan, oracle_state = ladder.reference_plan(cfg, oracle_state, length)
      src, new_length, state = ladder.ladder_plan(cfg, state, length, capacity)
      src, new_length = np.asarray(src), int(new_length)
      self.assertLen({len(p) for p in plan}, 1)  # every layer ends with the same length
      self.assertEqual(new_length, len(plan[0]), msg=f"{cfg} call {call}")
      np.testing.assert_array_equal(src[:, :new_length], np.asarray(plan), err_msg=f"{cfg} call {call}")
      np.testing.assert_array_equal(src[:, new_length:], -1)
      self.assertEqual(_state_dict(state), oracle_state, msg=f"{cfg} call {call}")
      positions = np.take_along_axis(positions, src[:, :new_length], axis=1)
      sinks = np.arange(min(cfg.start_size, new_length))
      np.testing.assert_array_equal(positions[:, :len(sinks)], np.tile(sinks, (n, 1)))  # sinks are always kept
      if prefill == 1 and oracle_state["compacted"]:
        # Streaming keeps the last N slots as a reserve: the cursor never passes C' - N. The length dips up to
        # R - 1 below C', so the newest N - R + 1 tokens (not N, as a hand restatement says; that needs R = 1) stay in
        # order at the end of every layer.
        self.assertLessEqual(oracle_state["cursor"], oracle_state["cache_size"] - n)
        newest = np.arange(positions[0, -1] - (n - cfg.R), positions[0, -1] + 1)
        np.testing.assert_array_equal(positions[:, -len(newest):], np.tile(newest, (n, 1)))
      positions = np.concatenate([positions, np.full((n, 1), prefill + call)], axis=1)

  def test_no_op_then_compensation_once(self):
    cfg = LadderConfig(32, 8, 4, 256, 4)  # R = 5, compensation 2
    state = ladder.init_ladder_state(cfg)
    src, length, state2 = ladder.ladder_plan(cfg, state, 256, 300)
    np.testing.assert_array_equal(np.asarray(src)[:, :256], np.tile(np.arange(256), (32, 1)))
    np.testing.assert_array_equal(np.asarray(src)[:, 256:], -1)
    self.assertEqual((int(length), _state_dict(state2)), (256, _state_dict(state)))
    # 257 > 256 triggers the first compaction: C becomes 258 and 257 tokens fit, so nothing moves.
    src, length, state = ladder.ladder_plan(cfg, state, 257, 300)
    self.assertEqual((int(length), _state_dict(state)), (257, dict(cursor=4, compacted=True, cache_size=258)))
    np.testing.assert_array_equal(np.asarray(src)[:, :257], np.tile(np.arange(257), (32, 1)))
    # Later calls keep C = 258: 258 is a no-op, 259 compacts one group of B = 7 into A = 2 slots.
    _, length, state = ladder.ladder_plan(cfg, state, 258, 300)
    self.assertEqual((int(length), _state_dict(state)), (258, dict(cursor=4, compacted=True, cache_size=258)))
    _, length, state = ladder.ladder_plan(cfg, state, 259, 300)
    self.assertEqual((int(length), _state_dict(state)), (254, dict(cursor=6, compacted=True, cache_size=258)))

  def test_state_carried_through_while_loop(self):
    cfg = LadderConfig(8, 3, 1, 20, 1)
    tokens = 300

    def body(carry):
      seen, length, state = carry
      _, length, state = ladder.ladder_plan(cfg, state, length + 1, cfg.stream_capacity)
      return seen + 1, length, state

    _, length, state = jax.jit(lambda: jax.lax.while_loop(
        lambda carry: carry[0] < tokens, body, (jnp.int32(0), jnp.int32(0), ladder.init_ladder_state(cfg))))()
    oracle_state, oracle_length = _state_dict(ladder.init_ladder_state(cfg)), 0
    for _ in range(tokens):
      plan, oracle_state = ladder.reference_plan(cfg, oracle_state, oracle_length + 1)
      oracle_length = len(plan[0])
    self.assertEqual((int(length), _state_dict(state)), (oracle_length, oracle_state))


class InvariantTest(parameterized.TestCase):
  """Invariants of the reference's arithmetic, checked on the jnp planner's traces of the golden configurations."""

  @parameterized.named_parameters((c["name"], c["name"]) for c in _GOLDEN["streaming"])
  def test_length_band_after_first_compaction(self, name):
    # After the first compaction the length stays in (C' - R, C'], C' = C + floor(R/2); for R = 1 it is exactly C.
    cfg = _config(_CASES[name])
    lengths = _trace(name).lengths[cfg.cache_size:]  # calls after C + 1 tokens
    compensated = cfg.cache_size + cfg.compensation
    self.assertTrue(np.all((lengths > compensated - cfg.R) & (lengths <= compensated)), msg=name)
    if cfg.R == 1:
      np.testing.assert_array_equal(lengths, cfg.cache_size)

  def test_s8_o4_length_statistics(self):
    # A hand restatement says 254-257 with mean 254.0; the reference (N=32) gives 254-258 with mean 256.0: the compensation
    # floor(5/2) = 2 centres the band (C'-R, C'] = (253, 258] on the nominal C = 256.
    lengths = _trace("N32_S8_O4_C256_s4").lengths[256:]
    self.assertEqual((lengths.min(), lengths.max()), (254, 258))
    self.assertAlmostEqual(lengths.mean(), 256.0, delta=0.01)

  def test_n32_s16_coverage(self):
    trace = _trace("N32_S16_O0_C256_s4")
    kept = trace.kept[8193]
    counts = collections.Counter(kept.ravel().tolist())
    # 459 distinct tokens; each is held by 16 layers except the sinks and the recent tail, held by all 32.
    self.assertLen(counts, 459)
    everywhere = sorted(t for t, c in counts.items() if c == 32)
    self.assertEqual(set(counts.values()), {16, 32})
    tail = everywhere[4:]
    self.assertEqual(everywhere[:4], [0, 1, 2, 3])
    self.assertEqual(tail, list(range(8193 - len(tail), 8193)))
    self.assertGreaterEqual(len(tail), 32)
    # The oldest non-sink token of odd layers is 6,639; even layers still hold token 4 (the token-s quirk).
    self.assertEqual({int(kept[i, 4]) for i in range(1, 32, 2)}, {6639})
    self.assertEqual({int(kept[i, 4]) for i in range(0, 32, 2)}, {4})
    # After 1,025 tokens layer 0 reaches back to the start at stride 16 (4, 20, ..., 436), then 12, 8, 4, 2, 1.
    layer0 = trace.kept[1025][0]
    np.testing.assert_array_equal(layer0[4:32], 4 + 16 * np.arange(28))
    self.assertEqual(int(layer0[32]), 448)

  @parameterized.named_parameters((c["name"], c["name"]) for c in _GOLDEN["streaming"])
  def test_phase_zero_layers_never_drop_token_s(self, name):
    cfg = _config(_CASES[name])
    phase0 = _modular_phase(cfg) == 0
    for tokens, kept in _trace(name).kept.items():
      if tokens > cfg.start_size:
        self.assertTrue(np.all(kept[phase0, cfg.start_size] == cfg.start_size), msg=f"{name} @ {tokens}")
    final = _trace(name).kept[_CASES[name]["num_tokens"]]
    self.assertTrue(np.all(final[~phase0, cfg.start_size] > cfg.start_size), msg=name)

  def test_longbench_half_budget(self):
    # P=3500, C=1750, s=128, N=32, S=16, O=0. A hand restatement calls this a T > 1 startover; the reference takes a single
    # pass (T = 1: 160 tokens left after the first pass, one pass removes 1590), cursor 128 + 160.
    case = _CASES["longbench_llama2_b0.5_S16_O0"]
    self.assertEqual(case["prefill_passes"], 1)
    trace = _trace(case["name"])
    kept = trace.kept[3500]
    self.assertEqual(kept.shape, (32, 1750))
    self.assertEqual(int(trace.states.cursor[0]), 288)
    counts = collections.Counter(kept.ravel().tolist())
    holders = collections.Counter(counts.values())
    self.assertEqual((holders[16], holders[32], 3500 - len(counts)), (2860, 320, 320))
    # Held by all layers: the sinks 0-127 and a contiguous recent tail of 192 tokens.
    self.assertEqual(sorted(t for t, c in counts.items() if c == 32), [*range(128), *range(3308, 3500)])
    # In between, layer 0 keeps token 128 (the token-s quirk), then 160 tokens at stride 4 (the re-laddered
    # region), then stride 2 up to the tail; layer 1 is the complement, starting at 131.
    np.testing.assert_array_equal(np.diff(kept[0, 128:-191]), [4] * 160 + [2] * 1270)
    self.assertEqual(int(kept[1, 128]), 131)

  def test_longbench_quarter_budget(self):
    # C=875, S=9, O=3: a two-pass startover leaves 872 slots (< C + compensation = 876), 875 tokens in no layer.
    case = _CASES["longbench_llama2_b0.25_S9_O3"]
    self.assertEqual(case["prefill_passes"], 2)
    kept = _trace(case["name"]).kept[3500]
    self.assertEqual(kept.shape, (32, 872))
    self.assertLen(set(range(3500)) - set(kept.ravel().tolist()), 875)
    # Quirk: with T=2, A=2 the phase-R_T layers (i mod 8 == 7) reach one slot past their last group and hold the
    # first tail token twice.
    twice = [i for i in range(32) if len(set(kept[i].tolist())) < 872]
    self.assertEqual(twice, [7, 15, 23, 31])

  @parameterized.named_parameters(
      ("N32_S16", "N32_S16_O0_C256_s4"), ("N32_S9_O3", "N32_S9_O3_C128_s4"), ("N24_S9_O7", "N24_S9_O7_C200_s64"))
  def test_contiguous_is_a_layer_permutation_in_streaming(self, name):
    # Streaming always re-ladders with T = 1, so both mappings use phases mod R + 1 and "contiguous" only
    # reorders the layers: layer i of it is layer order[i] of the reference.
    cfg = _config(_CASES[name])
    order = np.argsort(_modular_phase(cfg), kind="stable")
    modular, contiguous = _trace(name), _trace(name, "contiguous")
    np.testing.assert_array_equal(contiguous.lengths, modular.lengths)
    for tokens, kept in modular.kept.items():
      np.testing.assert_array_equal(contiguous.kept[tokens], kept[order], err_msg=f"{name} @ {tokens}")
    if cfg.R == 1 and cfg.num_layers == 32:
      # N=32, S=16: layers 0-15 keep the older token of every pair, 16-31 the newer one (the paper's blocks).
      self.assertTrue(np.all(order[:16] % 2 == 0) and np.all(order[16:] % 2 == 1))


if __name__ == "__main__":
  absltest.main()
