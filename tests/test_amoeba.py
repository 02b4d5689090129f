"""AmoebaLLM end to end on a tiny model: masked execution, sliced export (spec §5.3), one-for-all training."""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from lacax import train
from lacax.model import llama
from lacax.subnets import calibrate, depth, execute, export, oneforall, smol, width
from lacax.subnets.shape import SubnetSpace
from lacax.weights.loader import load_model
from tests import subnet_models as sm
from tests import train_utils as tu

CFG = sm.CFG
L = CFG.num_layers
WIDTHS = (1.0, 0.875, 0.75, 0.625)
MIN_DEPTH = 5
CFG4 = sm.CFG4  # the grid of the export tests: depths 3..4 x 4 widths (one compiled sliced model per shape)
_subnet_logits = jax.jit(execute.subnet_logits, static_argnames=("cfg", "smol_cfg"))
_forward = jax.jit(llama.forward, static_argnames=("cfg",))


def _space(params, batches, cfg=CFG, min_depth=MIN_DEPTH):
  stats, bi = calibrate.collect_statistics(params, cfg, batches)
  masks = width.flap_width_masks(stats, params["layers"]["wo"], params["layers"]["w_down"], cfg, WIDTHS)
  strategy = depth.block_influence_strategy(bi, min_layers=min_depth)
  return SubnetSpace(strategy, masks, WIDTHS, min_depth)


def _nll(logits, tokens):
  lg, tgt = np.asarray(logits[:, :-1], np.float64), np.asarray(tokens[:, 1:])
  m = lg.max(-1, keepdims=True)
  lse = np.log(np.exp(lg - m).sum(-1)) + m[..., 0]
  return float(np.mean(lse - np.take_along_axis(lg, tgt[..., None], -1)[..., 0]))


class ExecutionAndExportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.params = sm.params(num_layers=4)
    cls.calib = sm.batches(2, seed=1)
    cls.space = _space(cls.params, cls.calib, CFG4, 3)
    cls.smol_cfg = smol.SMoLConfig(rank=4)
    init = smol.init_smol(jax.random.PRNGKey(0), llama.param_shapes(CFG4), 4 + len(WIDTHS), cls.smol_cfg)
    rng = np.random.RandomState(1)  # B = 0 at init; perturb so the adapters matter
    cls.smol = jax.tree.map(lambda x: x + 0.05 * rng.randn(*x.shape).astype(np.float32), init)
    cls.tokens = jnp.asarray(cls.calib[0])
    cls.positions = sm.positions(cls.tokens)

  def test_masked_equals_sliced_over_the_grid(self):
    for shape in self.space.grid():
      arrays = self.space.arrays(shape, CFG4)
      masked = _subnet_logits(self.params, self.tokens, self.positions, CFG4, arrays, self.smol, self.smol_cfg)
      sliced, sub_cfg, sizes = export.slice_subnet(self.params, CFG4, self.space, shape, self.smol, self.smol_cfg)
      logits, _ = llama.forward(jax.tree.map(jnp.asarray, sliced), self.tokens, self.positions, None, sub_cfg)
      np.testing.assert_allclose(np.asarray(logits), np.asarray(masked), atol=2e-5, rtol=0, err_msg=shape.label())
      # Per-layer sizes are the mask sums; the parameter count is the analytic one.
      g, f, _, _ = self.space.width.masks(shape.width)
      kept = [i for i, on in enumerate(shape.layer_mask) if on]
      self.assertEqual(sizes.kv_heads, tuple(max(int(g[i].sum()), 1) for i in kept))
      self.assertEqual(sizes.ffn, tuple(max(int(f[i].sum()), 1) for i in kept))
      D, hd, G = CFG4.hidden_size, CFG4.head_dim, CFG4.group_size
      per_layer = sum(kv * (D * hd * (G + 2) + G * hd * D) + ff * 3 * D + 4 * D
                      for kv, ff in zip(sizes.kv_heads, sizes.ffn))
      analytic = per_layer + 2 * CFG4.vocab_size * D + D
      self.assertEqual(export.sliced_param_count(sliced, sub_cfg), analytic)

  def test_width_one_full_depth_is_the_plain_forward_bit_for_bit(self):
    arrays = self.space.arrays(self.space.largest, CFG4)
    masked = _subnet_logits(self.params, self.tokens, self.positions, CFG4, arrays)
    plain, _ = _forward(self.params, self.tokens, self.positions, None, cfg=CFG4)
    np.testing.assert_array_equal(np.asarray(masked), np.asarray(plain))

  def test_gated_off_layer_is_skipped_exactly(self):
    shape = self.space.shape(3, 1.0)
    masked = _subnet_logits(self.params, self.tokens, self.positions, CFG4, self.space.arrays(shape, CFG4))
    keep = np.flatnonzero(shape.layer_mask)
    dropped = {**self.params, "layers": jax.tree.map(lambda a: a[keep], self.params["layers"])}
    logits, _ = _forward(dropped, self.tokens, self.positions, None, cfg=CFG4.replace(num_layers=len(keep)))
    np.testing.assert_array_equal(np.asarray(masked), np.asarray(logits))

  def test_export_round_trips_through_load_model(self):
    shape = self.space.shape(3, 0.75)
    sliced, sub_cfg, sizes = export.slice_subnet(self.params, CFG4, self.space, shape, self.smol, self.smol_cfg)
    with tempfile.TemporaryDirectory() as d:
      tok = tu.byte_tokenizer()
      path = export.save_subnet(os.path.join(d, "sub"), sliced, sub_cfg, sizes, shape=shape, source="base",
                                tokenizer=tok)
      model = load_model(path)
      self.assertEqual(model.cfg, sub_cfg)
      # One directory format: a verified lacax checkpoint with the subnet metadata and the tokenizer inside.
      _, _, meta = export.load_subnet(path)
      self.assertEqual((meta["kv_heads"], meta["ffn"], meta["source"]), (list(sizes.kv_heads), list(sizes.ffn),
                                                                         "base"))
      text = "module TopModule; endmodule"
      self.assertEqual(model.tokenizer.encode(text), tok.encode(text))
      self.assertEqual((model.tokenizer.bos_id, model.tokenizer.eos_id, model.tokenizer.stop_ids,
                        model.tokenizer.chat_template), (tok.bos_id, tok.eos_id, tok.stop_ids, tok.chat_template))
      logits, _ = _forward(model.params, self.tokens, self.positions, None, cfg=model.cfg)
      # The same compiled program on the sliced parameters: the round trip changed no bit of them.
      ref, _ = _forward(jax.tree.map(jnp.asarray, sliced), self.tokens, self.positions, None, cfg=sub_cfg)
      np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))
      with self.assertRaisesRegex(FileExistsError, "exists"):
        export.save_subnet(path, sliced, sub_cfg, sizes)
      # Cached decoding of the sliced model equals its teacher-forced logits.
      from lacax.cache.kv_cache import init_cache  # pylint: disable=g-import-not-at-top

      cache = init_cache(model.cfg, self.tokens.shape[0], self.tokens.shape[1])
      steps = []
      for t in range(self.tokens.shape[1]):
        lg, cache = _forward(model.params, self.tokens[:, t:t + 1], self.positions[:, t:t + 1], cache, cfg=model.cfg)
        steps.append(np.asarray(lg))
      np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(ref), atol=2e-5)


class OneForAllTest(absltest.TestCase):

  def test_sandwich_training_compiles_once_and_improves_every_subnet(self):
    base = sm.trained_params(steps=150, num_layers=4)
    calib = sm.batches(2, seed=1)
    space = _space(base, calib, CFG4, 3)
    smol_cfg = smol.SMoLConfig(rank=4)
    ofa = oneforall.OneForAllConfig()
    params = {"base": base,
              "smol": smol.init_smol(jax.random.PRNGKey(0), base, 4 + len(WIDTHS), smol_cfg)}
    labels = oneforall.labels(params)
    traces = []
    loss_fn = oneforall.sandwich_loss_fn(CFG4, smol_cfg, ofa, on_trace=lambda: traces.append(1))
    steps = 24
    opt, schedule = train.make_optimizer(train.OptimizerConfig(learning_rate=1e-3), steps)
    state = train.create_train_state(params, opt, labels=labels, seed=0)
    trainer = train.Trainer(loss_fn, opt, train.TrainConfig(steps=steps, progress=False), schedule=schedule,
                            labels=labels)
    data = sm.batches(steps, batch=8, length=24, seed=77)

    def batch_at(s):
      toks = data[s]
      b = {"tokens": toks, "targets": np.roll(toks, -1, 1), "positions": np.asarray(sm.positions(toks)),
           "mask": np.r_[np.ones(toks.shape[1] - 1), 0.0][None].repeat(toks.shape[0], 0).astype(np.float32)}
      return oneforall.sandwich_batch(b, s, space, CFG4, ofa)

    sandwiches = {tuple(s.label() for s in distill_shapes(space, ofa, s)) for s in range(steps)}
    self.assertGreater(len(sandwiches), 8)  # many different subnet sets ...
    state, _ = trainer.fit(state, batch_at)
    self.assertLen(traces, 1)  # ... and one compilation

    held = [jnp.asarray(b) for b in sm.batches(2, batch=8, seed=5)]
    trained = train.combine(state.trainable, state.frozen)["smol"]
    before, after = {}, {}
    for shape in space.grid():
      arrays = space.arrays(shape, CFG4)
      before[shape.label()] = np.mean([_nll(_subnet_logits(base, t, sm.positions(t), CFG4, arrays), t)
                                       for t in held])
      after[shape.label()] = np.mean([_nll(_subnet_logits(base, t, sm.positions(t), CFG4, arrays, trained, smol_cfg),
                                           t) for t in held])
    worse = {k: (before[k], after[k]) for k in before if after[k] >= before[k]}
    self.assertEmpty(worse)
    self.assertGreater(np.mean([before[k] - after[k] for k in before]), 0.005)


def distill_shapes(space, ofa, step):
  from lacax.subnets import distill  # pylint: disable=g-import-not-at-top

  return distill.sandwich(np.random.default_rng([ofa.seed, step]), space, ofa.num_random)


class AmoebaJobTest(absltest.TestCase):
  """`python -m experiments.run --config=configs/amoeba.py:tiny` end to end: calibrate, train, evaluate, export."""

  def test_tiny_job_writes_the_table_and_loadable_subnets(self):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as d:
      proc = subprocess.run([sys.executable, "-m", "experiments.run", "--config=configs/amoeba.py:tiny",
                             f"--config.results_dir={d}"], cwd=repo, capture_output=True, text=True, timeout=1200)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      (run,) = os.listdir(os.path.join(d, "amoeba"))
      run_dir = os.path.join(d, "amoeba", run)
      with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
      with open(os.path.join(run_dir, "status.json")) as f:
        self.assertEqual(json.load(f)["state"], "done")
      ratios = (0.8, 0.65)
      methods = ("uniform", "shortgpt", "flap", "amoeba_before", "amoeba")
      self.assertEqual(sorted((r["ratio"], r["method"]) for r in results["table"]),
                       sorted((r, m) for r in ratios for m in methods))
      for row in results["table"]:
        self.assertTrue(np.isfinite(row["ppl"]), row)
        self.assertLessEqual(row["fraction"], 1.0)
      self.assertEqual(results["train"]["steps"], 4)
      self.assertEqual(len(results["grid_after"]), len(results["grid_before"]))
      for plot in ("pareto.png", "loss_curve.png"):
        self.assertTrue(os.path.isfile(os.path.join(run_dir, plot)), plot)
      # Every exported subnet is an ordinary lacax checkpoint that load_model reads back with its shape.
      self.assertEqual(sorted(e["ratio"] for e in results["exported"]), sorted(ratios))
      for entry in results["exported"]:
        model = load_model(entry["path"])
        depth_of_shape = int(entry["shape"].split("_")[0][1:])
        self.assertEqual(model.cfg.num_layers, depth_of_shape)


if __name__ == "__main__":
  absltest.main()
