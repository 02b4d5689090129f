"""bench_decode's targets: judged by the median of within-round ratios, against the best peer row of each round."""

from absl.testing import absltest

from experiments import decode_targets


def lacax(dtype, context, rates, weights="dense", **extra):
  return {"impl": "lacax", "dtype": dtype, "weights": weights, "rope_mode": "slot", "cpu_kernel": True,
          "quant_kernel": True, "context": context, "decode_tokens_per_second": max(rates), "round_rates": rates,
          **extra}


def llama(kind, context, rates, flash_attn=False):
  return {"impl": "llama.cpp", "type": kind, "flash_attn": flash_attn, "context": context,
          "decode_tokens_per_second": max(rates), "round_rates": rates}


def by_name(judged):
  return {(j["target"], j["context"]): j for j in judged}


class JudgeTest(absltest.TestCase):

  def test_round_ratios_use_the_best_peer_row_of_each_round(self):
    runs = [lacax("bfloat16", 512, [90.0, 80.0, 100.0]),
            llama("F16", 512, [100.0, 70.0, 90.0]), llama("BF16", 512, [80.0, 75.0, 95.0], flash_attn=True)]
    (j,) = decode_targets.judge(runs, [decode_targets.TARGETS[1]])
    # rounds: 90 / 100, 80 / 75, 100 / 95
    self.assertSequenceAlmostEqual(j["round_ratios"], [0.9, 80 / 75, 100 / 95])
    self.assertAlmostEqual(j["median_round_ratio"], 100 / 95)
    self.assertTrue(j["met"])
    self.assertAlmostEqual(j["ratio_of_medians"], 90.0 / 90.0)   # lacax 90; peers' medians 90 and 80
    self.assertAlmostEqual(j["best_ratio"], 100.0 / 100.0)
    self.assertEqual(j["rounds"], 3)
    self.assertEqual(j["peer"], ["llama.cpp/F16/fa=off", "llama.cpp/BF16/fa=on"])

  def test_drift_shared_by_both_sides_cancels(self):
    # lacax 2% slower in every round, however loaded the round (the rates move by 3x): 0.98 in each.
    runs = [lacax("float32", 512, [50.0 * 0.98, 98.0 * 0.98, 30.0 * 0.98]), llama("F32", 512, [50.0, 98.0, 30.0])]
    (j,) = decode_targets.judge(runs, [decode_targets.TARGETS[0]])
    self.assertSequenceAlmostEqual(j["round_ratios"], [0.98] * 3)
    self.assertAlmostEqual(j["median_round_ratio"], 0.98)
    self.assertFalse(j["met"])

  def test_own_ratio_targets_and_their_contexts(self):
    runs = [lacax("float32", 512, [50.0, 40.0]), lacax("bfloat16", 512, [90.0, 70.0]),
            lacax("float32", 4096, [30.0, 30.0]), lacax("bfloat16", 4096, [60.0, 60.0]),
            lacax("float32", 512, [140.0, 120.0], weights="int4"),
            lacax("bfloat16", 512, [150.0, 90.0], weights="q4_1"),
            lacax("float32", 4096, [70.0, 70.0], weights="int4")]
    got = by_name(decode_targets.judge(runs))
    self.assertNotIn(("bfloat16 >= 1.7x lacax float32", 4096), got)  # a 512-token target only
    self.assertAlmostEqual(got["bfloat16 >= 1.7x lacax float32", 512]["median_round_ratio"], (1.8 + 1.75) / 2)
    self.assertTrue(got["bfloat16 >= 1.7x lacax float32", 512]["met"])
    # The 4-bit row with the higher median: int4 (130) over q4_1 (120).
    int4 = got["int4 >= 2.5x lacax float32", 512]
    self.assertEqual(int4["lacax"]["label"], "lacax/slot/int4")
    self.assertAlmostEqual(int4["median_round_ratio"], (2.8 + 3.0) / 2)
    self.assertFalse(got["int4 >= 2.5x lacax float32", 4096]["met"])  # 70 / 30
    self.assertNotIn(("int4 >= llama.cpp Q4_1", 512), got)  # no llama.cpp rows: nothing to judge

  def test_rows_without_lacax_kernels_or_with_a_float_head_are_not_judged(self):
    runs = [lacax("float32", 512, [200.0], cpu_kernel=False), lacax("float32", 512, [10.0]),
            lacax("float32", 512, [300.0], weights="int8", pack_head=False),
            lacax("float32", 512, [20.0], weights="int8"),
            llama("F32", 512, [20.0]), llama("Q8_0", 512, [10.0])]
    got = by_name(decode_targets.judge(runs))
    self.assertAlmostEqual(got["float32 >= llama.cpp F32", 512]["median_round_ratio"], 0.5)
    self.assertAlmostEqual(got["int8 >= llama.cpp Q8_0", 512]["median_round_ratio"], 2.0)
    self.assertEqual(got["int8 >= llama.cpp Q8_0", 512]["rounds"], 1)

  def test_int8_kv_rows_are_judged_only_by_their_own_target(self):
    runs = [lacax("float32", 4096, [30.0, 30.0]), lacax("float32", 4096, [90.0, 90.0], kv_bits=8),
            lacax("bfloat16", 4096, [70.0, 72.0], weights="int4"),
            lacax("bfloat16", 4096, [84.0, 81.0], weights="int4", kv_bits=8),
            llama("Q4_1", 4096, [80.0, 80.0])]
    got = by_name(decode_targets.judge(runs))
    plain = got["int4 >= 2.5x lacax float32", 4096]
    self.assertEqual(plain["lacax"]["label"], "lacax/slot/int4")
    self.assertAlmostEqual(plain["median_round_ratio"], 71.0 / 30.0)  # the float32 row with a float32 cache
    with_kv = got["int4 + int8 KV >= 2.5x lacax float32", 4096]
    self.assertEqual(with_kv["lacax"]["label"], "lacax/slot/int4/kv=int8")
    self.assertAlmostEqual(with_kv["median_round_ratio"], (2.8 + 2.7) / 2)
    self.assertTrue(with_kv["met"])
    self.assertAlmostEqual(got["int4 >= llama.cpp Q4_1", 4096]["median_round_ratio"], 71.0 / 80.0)

  def test_table_has_a_line_per_judged_target(self):
    runs = [lacax("float32", 512, [50.0, 52.0]), llama("F32", 512, [48.0, 50.0])]
    judged = decode_targets.judge(runs)
    text = decode_targets.table(judged)
    self.assertLen(text.splitlines(), 1 + len(judged))
    self.assertIn("float32 >= llama.cpp F32", text)
    self.assertIn("yes", text)


if __name__ == "__main__":
  absltest.main()
