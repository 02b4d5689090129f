"""Sharded training (FSDP over parameters and optimizer state, data parallelism, tensor parallelism) by the
rules of `lacax.sharding` equals single-device training, on 8 fake CPU devices.

The 8-device runs happen in a child process (`python -m tests.test_train_sharding <report.json>`), because the
number of fake CPU devices is fixed when JAX's backend starts (as in tests/test_sharding.py). The child trains a
tiny Llama with the next-token loss for a few AdamW steps with gradient accumulation, once on one device and once
per mesh, and records per mesh: the largest parameter difference against the single-device run, the per-step
losses, and the layouts (parameters and Adam moments split as the rules say, kept so by the compiled step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback

if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                             " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest, parameterized  # noqa: E402
import numpy as np  # noqa: E402

MESHES = (((2, 4), ("data", "fsdp")), ((4, 2), ("fsdp", "tensor")), ((8,), ("fsdp",)), ((2, 2, 2), ("data", "fsdp",
                                                                                                       "tensor")))
STEPS = 3


def _name(shape, axes) -> str:
  return "x".join(f"{a}{s}" for s, a in zip(shape, axes))


def child(report_path: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top

  from lacax import sharding as sh  # pylint: disable=g-import-not-at-top
  from lacax.model import llama  # pylint: disable=g-import-not-at-top
  from lacax.train import data as data_lib, losses, loop, optim  # pylint: disable=g-import-not-at-top
  from lacax.train import state as st  # pylint: disable=g-import-not-at-top
  from tests import train_utils as tu  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, jax.devices()
  cfg = tu.tiny_llama_cfg(vocab_size=128, hidden_size=32, intermediate_size=64, num_heads=8, num_kv_heads=4,
                          head_dim=8)
  params = llama.init_params(cfg, jax.random.PRNGKey(0), std=0.05)
  rng = np.random.RandomState(0)
  ds = data_lib.pack_ids(rng.randint(0, cfg.vocab_size, 2000), seq_len=16, batch_size=8, seed=0)
  # An answer-only style mask: uneven target counts per row, so the weighting of micro-batches matters.
  def batch_at(step):
    b = ds.batch(step)
    b["mask"] = (np.arange(16)[None, :] >= (np.arange(8) % 5)[:, None]).astype(np.float32)
    return b

  loss_fn = losses.llama_loss_fn(cfg)
  ocfg = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=1, weight_decay=0.1)

  def run(mesh_rules):
    opt, sched = optim.make_optimizer(ocfg, STEPS)
    state = st.create_train_state(params, opt)
    trainer = loop.Trainer(loss_fn, opt, loop.TrainConfig(steps=STEPS, accum_steps=2, progress=False),
                           schedule=sched, mesh_rules=mesh_rules)
    state = trainer.place(state)
    placed = state
    in_shardings = jax.tree_util.tree_map(lambda x: x.sharding, placed)
    losses_ = []
    for s in range(STEPS):
      state, m = trainer.step(state, batch_at(s))
      losses_.append(float(m["loss"]))
    return state, losses_, in_shardings

  ref_state, ref_losses, _ = run(None)
  ref_params = jax.device_get(ref_state.params)
  report = {"ref_losses": ref_losses}
  for shape, axes in MESHES:
    name = _name(shape, axes)
    try:
      mr = sh.MeshRules(sh.make_mesh(shape, axes))
      state, losses_, in_sh = run(mr)
      got = jax.device_get(state.params)
      diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref_params)))
      wq_spec = state.trainable["layers"]["wq"].sharding.spec
      adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's first part is scale_by_adam
      mu_spec = adam.mu["layers"]["wq"].sharding.spec
      expected = mr.spec(sh.LAYER_PARAM_AXES["wq"], state.trainable["layers"]["wq"].shape)
      out_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
      same_layout = all(a.is_equivalent_to(b, np.ndim(x)) for a, b, x in zip(
          jax.tree_util.tree_leaves(in_sh), jax.tree_util.tree_leaves(out_sh), jax.tree_util.tree_leaves(state)))
      shard_elems = state.trainable["layers"]["wq"].addressable_shards[0].data.size
      report[name] = {"ok": True, "max_param_diff": diff, "losses": losses_, "wq_spec": str(wq_spec),
                      "mu_spec": str(mu_spec), "expected_spec": str(expected), "same_layout": bool(same_layout),
                      "wq_shard_fraction": shard_elems / state.trainable["layers"]["wq"].size,
                      "fsdp_size": dict(mr.axis_sizes).get("fsdp", 1),
                      "replicated": expected == PartitionSpec(*([None] * 4))}
    except Exception:  # pylint: disable=broad-except
      report[name] = {"ok": False, "error": traceback.format_exc()}
  with open(report_path, "w") as f:
    json.dump(report, f, indent=1)


class ShardedTrainingTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    path = os.path.join(tempfile.mkdtemp(prefix="lacax_train_sharding_"), "report.json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "tests.test_train_sharding", path], cwd=root, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode != 0 or not os.path.exists(path):
      raise AssertionError(f"sharded-training child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    with open(path) as f:
      cls.report = json.load(f)

  @parameterized.parameters(*MESHES)
  def test_sharded_equals_single_device(self, shape, axes):
    r = self.report[_name(shape, axes)]
    self.assertTrue(r["ok"], r.get("error"))
    self.assertLess(r["max_param_diff"], 2e-5)
    np.testing.assert_allclose(r["losses"], self.report["ref_losses"], rtol=2e-5)
    self.assertLess(r["losses"][-1], r["losses"][0])
    # FSDP: parameters and their Adam moments split by the rules, and kept so by the compiled step.
    self.assertEqual(r["wq_spec"], r["expected_spec"])
    self.assertEqual(r["mu_spec"], r["expected_spec"])
    self.assertTrue(r["same_layout"])
    self.assertFalse(r["replicated"])
    self.assertLessEqual(r["wq_shard_fraction"], 1.0 / r["fsdp_size"])


if __name__ == "__main__":
  if len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
    child(sys.argv[1])
  else:
    absltest.main()
