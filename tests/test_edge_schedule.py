"""The hardware scheduling model (`lacax.compress.schedule`, lacax's own analytic formulation).

Chosen tilings respect the buffer; fewer bits and more sparsity lower the modelled latency; the search is never
worse than the default mapping; the traffic model's reuse rule (a tile stays resident across loops that do not
index it); a tuning window costs less than full backprop.
"""

from __future__ import annotations

from absl.testing import absltest
import numpy as np

from lacax.compress import schedule as sch
from tests import train_utils as tu

DEVICE = sch.Device(buffer_bytes=64 * 1024, lanes=64, dram_bytes_per_cycle=8.0)
SHAPES = ((1, 256, 512), (64, 256, 512), (7, 96, 300))


class ScheduleTest(absltest.TestCase):

  def test_search_respects_the_buffer_and_never_loses_to_the_default(self):
    for m, k, n in SHAPES:
      for bits, sparsity in ((16, 0.0), (8, 0.0), (4, 0.5), (2, 0.7)):
        w = sch.Matmul("x", m, k, n, bits, 8, sparsity)
        mapping, c = sch.search(w, DEVICE)
        self.assertTrue(c.feasible)
        self.assertLessEqual(c.buffer_bytes, DEVICE.buffer_bytes)
        self.assertLessEqual(mapping.tm, m)
        self.assertLessEqual(mapping.tk, k)
        self.assertLessEqual(mapping.tn, n)
        self.assertEqual(mapping.par_m * mapping.par_n, DEVICE.lanes)
        default = sch.cost(w, DEVICE, sch.default_mapping(w, DEVICE))
        self.assertTrue(default.feasible)
        self.assertLessEqual(c.latency_cycles, default.latency_cycles)
    # An oversized tile is infeasible.
    big = sch.Mapping(tm=64, tk=256, tn=512, par_m=1, par_n=64)
    self.assertFalse(sch.cost(sch.Matmul("x", 64, 256, 512), DEVICE, big).feasible)

  def test_bits_and_sparsity_lower_latency(self):
    for m, k, n in SHAPES:
      lat = {}
      for bits in (16, 8, 4, 2):
        for s in (0.0, 0.5, 0.75):
          lat[bits, s] = sch.search(sch.Matmul("x", m, k, n, bits, bits, s), DEVICE)[1].latency_cycles
      for s in (0.0, 0.5, 0.75):
        self.assertTrue(all(lat[a, s] > lat[b, s] for a, b in ((16, 8), (8, 4), (4, 2))), (m, k, n, s, lat))
      for bits in (16, 8, 4, 2):
        self.assertGreater(lat[bits, 0.0], lat[bits, 0.75], (m, k, n, bits))

  def test_traffic_reuse_rule(self):
    w = sch.Matmul("x", 64, 256, 512, 8, 8)
    mapping = sch.Mapping(tm=16, tk=64, tn=128, order="nkm", par_m=1, par_n=64)
    c = sch.cost(w, DEVICE, mapping)
    # m innermost: each weight tile loads once; activations reload per n tile; outputs spill while k is not
    # innermost (3 revisits of each output tile, float32 read + write).
    weights, acts = 256 * 512, 64 * 256 * (512 // 128)
    outputs = 64 * 512 + 2 * 3 * 64 * 512 * 4
    self.assertEqual(c.dram_bytes, weights + acts + outputs)

  def test_model_schedule_and_tuning_window(self):
    cfg = tu.tiny_llama_cfg(num_layers=4, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
                            head_dim=32)
    mixed = [sch.LayerPrecision(8, 8, 8, 0.5), sch.LayerPrecision(4, 8, 8, 0.3),
             sch.LayerPrecision(8, 8, 8, 0.0), sch.LayerPrecision(16, 16, 16, 0.0)]
    dense = [sch.LayerPrecision()] * 4
    r_mixed = sch.schedule_model(cfg, mixed, DEVICE, tokens=1, context=64)
    r_dense = sch.schedule_model(cfg, dense, DEVICE, tokens=1, context=64)
    self.assertLen(r_mixed["layers"], 4 * 9)
    self.assertLess(r_mixed["latency_cycles"], r_dense["latency_cycles"])
    self.assertGreaterEqual(r_mixed["speedup_vs_default"], 1.0)
    self.assertTrue(all(row["latency_cycles"] <= row["default_latency_cycles"] for row in r_mixed["layers"]))
    window = sch.schedule(sch.tuning_workloads(cfg, mixed, 32, (2, 4)), DEVICE)
    full = sch.schedule(sch.tuning_workloads(cfg, mixed, 32, None), DEVICE)
    self.assertLess(window["latency_cycles"], full["latency_cycles"])
    with self.assertRaisesRegex(ValueError, "lanes=48"):
      sch.Device(lanes=48)
    with self.assertRaisesRegex(ValueError, "sparsity=1.0"):
      sch.Matmul("x", 1, 2, 3, sparsity=1.0)
    self.assertTrue(np.isfinite(r_mixed["latency_s"]))


if __name__ == "__main__":
  absltest.main()
