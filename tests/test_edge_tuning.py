"""Edge-LLM adaptive layer tuning and voting (`lacax.compress.tuning`, `lacax.compress.voting`) on a tiny Llama.

Window gradients are exactly zero outside the window; the loss does not depend on anything above the exit; the
compiled step's temporary memory shrinks with the window; the phase schedule covers max_steps; two-stream
inference resets the adapted stream at window boundaries; `tune` trains the adapters and heads through the loop
while the base stays bit-identical; the vote's invariants.
"""

from __future__ import annotations

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from lacax.compress import tuning, voting
from lacax.model import llama
from lacax.model import lora as lora_lib
from lacax.train import data as data_lib
from lacax.train import optim
from lacax.train import loop
from tests import train_utils as tu

LORA = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))


def _batch(cfg, B=2, T=12, seed=2):
  tok = jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return {"tokens": tok, "targets": jnp.roll(tok, -1, axis=1), "mask": jnp.ones((B, T), jnp.float32),
          "positions": pos}


def _nonzero_rows(x):
  a = np.abs(np.asarray(x)).reshape(x.shape[0], -1).sum(axis=1)
  return set(np.nonzero(a)[0].tolist())


class TuningTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg = tu.tiny_llama_cfg(num_layers=8)
    cls.params = llama.init_params(cls.cfg, jax.random.PRNGKey(0), std=0.05)
    cls.tcfg = tuning.TuningConfig(stride=2, lora=LORA)
    tree = tuning.init_tree(cls.params, cls.cfg, cls.tcfg, jax.random.PRNGKey(1))
    # Nonzero B so that every adapter changes the forward.
    cls.tree = {**tree, "lora": jax.tree.map(lambda x: x + 0.02, tree["lora"])}
    cls.batch = _batch(cls.cfg)

  def _loss(self, tree, phase, tcfg=None):
    return tuning.phase_loss_fn(self.cfg, tcfg or self.tcfg, phase)(tree, None, self.batch, None)[0]

  def test_gradients_are_exactly_zero_outside_the_window(self):
    phase = 1  # window = layers 2, 3
    grads = jax.grad(self._loss)(self.tree, phase)
    for name in ("wq", "wv", "w_down"):
      for part in ("a", "b"):
        self.assertEqual(_nonzero_rows(grads["lora"][name][part]), {2, 3}, f"lora {name}.{part}")
    for name, g in grads["params"]["layers"].items():
      self.assertEqual(_nonzero_rows(g), {2, 3}, f"base layers.{name}")
    for name in ("embed", "final_norm", "lm_head"):  # stop_gradient at the window input; raw-residual head
      self.assertFalse(np.any(np.asarray(grads["params"][name])), name)
    for k, g in enumerate(grads["heads"]):
      self.assertEqual(bool(np.any(np.asarray(g))), k == phase, f"head {k}")

  def test_loss_does_not_depend_on_layers_above_the_exit(self):
    phase = 1
    base = float(self._loss(self.tree, phase))
    above = lambda x: x.at[4:].set(x[4:] * 3.0 + 1.0)  # noqa: E731
    changed = {
        "params": {**self.tree["params"], "layers": jax.tree.map(above, self.tree["params"]["layers"]),
                   "lm_head": self.tree["params"]["lm_head"] + 1.0,
                   "final_norm": self.tree["params"]["final_norm"] * 2},
        "lora": jax.tree.map(above, self.tree["lora"]),
        "heads": [h if k == phase else h + 5.0 for k, h in enumerate(self.tree["heads"])]}
    self.assertEqual(float(self._loss(changed, phase)), base)

  def test_compiled_temporary_memory_shrinks_with_the_window(self):
    cfg = tu.tiny_llama_cfg(num_layers=8, vocab_size=64)
    params = llama.init_params(cfg, jax.random.PRNGKey(0), std=0.05)
    batch = _batch(cfg, B=4, T=64)
    temps = {}
    for stride, phase in ((8, 0), (2, 3)):  # full backprop to the top exit vs a 2-layer window at the top
      tcfg = tuning.TuningConfig(stride=stride, exit_head="tied", lora=LORA)
      tree = tuning.init_tree(params, cfg, tcfg, jax.random.PRNGKey(1))
      temps[stride] = tuning.compiled_step_memory(cfg, tcfg, tree, batch, phase)["temp_bytes"]
    self.assertLess(temps[2], 0.8 * temps[8], temps)

  def test_phase_schedule_covers_max_steps(self):
    for steps, phases in ((10, 4), (8, 4), (4, 4), (1001, 3)):
      sched = tuning.phase_schedule(steps, phases)
      self.assertLen(sched, phases)
      self.assertEqual(sched[0][0], 0)
      self.assertEqual(sched[-1][1], steps)
      for (_, end), (begin, _) in zip(sched, sched[1:]):
        self.assertEqual(end, begin)
      lengths = [e - b for b, e in sched]
      self.assertTrue(all(l == steps // phases for l in lengths[:-1]))
      self.assertEqual(lengths[-1], steps // phases + steps % phases)
    self.assertEqual(tuning.exit_layers(32, 8), (7, 15, 23, 31))
    self.assertEqual(tuning.windows(30, 8), ((0, 8), (8, 16), (16, 24), (24, 30)))
    with self.assertRaisesRegex(ValueError, "max_steps=3"):
      tuning.phase_schedule(3, 4)
    with self.assertRaisesRegex(ValueError, "exit_head='shared'"):
      tuning.TuningConfig(exit_head="shared")

  def test_two_stream_inference(self):
    cfg, tok, pos = self.cfg, self.batch["tokens"], self.batch["positions"]
    tcfg = tuning.TuningConfig(stride=2, exit_head="tied", exit_norm="final_norm", lora=LORA)
    fresh = tuning.init_tree(self.params, cfg, tcfg, jax.random.PRNGKey(1))  # B = 0: adapters are the identity
    exit_logits = jax.jit(lambda tree: tuning.exit_logits(tree, tok, pos, cfg, tcfg))  # one compile for all
    exits, final = exit_logits(fresh)
    plain = llama.run(self.params, tok, pos, None, cfg, options=llama.ForwardOptions(hidden_layers=(2, 4, 6, 8)))
    np.testing.assert_allclose(final, plain.logits, atol=1e-5)
    for k in range(4):
      np.testing.assert_allclose(exits[k], llama.unembed(self.params, plain.hidden[k], cfg), atol=1e-5)
    # The adapted stream restarts from the backbone at each boundary: window 0's adapters move exit 0 only.
    tree = {**fresh, "lora": jax.tree.map(lambda x: x + 0.02, fresh["lora"])}
    only0 = jax.tree.map(lambda x: x.at[2:].set(0.0), tree["lora"])
    ex_all, _ = exit_logits(tree)
    ex_0, _ = exit_logits({**fresh, "lora": only0})
    self.assertGreater(float(jnp.max(jnp.abs(ex_0[0] - exits[0]))), 1e-4)
    np.testing.assert_array_equal(ex_0[1:], exits[1:])
    np.testing.assert_array_equal(ex_all[0], ex_0[0])

  def test_tune_trains_the_windows_through_the_loop(self):
    cfg = tu.tiny_llama_cfg(num_layers=4)
    params = llama.init_params(cfg, jax.random.PRNGKey(0), std=0.05)
    tcfg = tuning.TuningConfig(stride=2, lora=lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv")))
    ids = np.tile(np.arange(9) * 29 % cfg.vocab_size, 40)
    data = data_lib.pack_ids(ids, seq_len=16, batch_size=4)
    steps = 13
    opt, sched = optim.make_optimizer(optim.OptimizerConfig(learning_rate=3e-3), steps)
    result = tuning.tune(params, cfg, tcfg, data.batch, max_steps=steps, optimizer=opt, schedule=sched,
                         train_config=loop.TrainConfig(steps=steps, progress=False, log_every=1))
    self.assertEqual(result.phases, ((0, 6), (6, 13)))
    self.assertEqual([r["step"] for r in result.records], list(range(1, steps + 1)))
    self.assertEqual([r["phase"] for r in result.records], [0] * 6 + [1] * 7)
    for k, (begin, end) in enumerate(result.phases):
      losses = [r["loss"] for r in result.records if r["phase"] == k]
      self.assertLess(losses[-1], losses[0], f"phase {k}")
    jax.tree.map(np.testing.assert_array_equal, result.tree["params"], params)  # the base never moves
    for k, head in enumerate(result.tree["heads"]):
      self.assertGreater(float(jnp.max(jnp.abs(head - params["lm_head"]))), 0.0, f"head {k} trained")
    self.assertEqual(_nonzero_rows(result.tree["lora"]["wq"]["b"]), {0, 1, 2, 3})


class VotingTest(absltest.TestCase):

  def test_vote_invariants(self):
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 5, 11)) * 3
    combined = voting.vote(logits)
    np.testing.assert_allclose(jnp.sum(combined, axis=-1), 1.0, rtol=1e-6)
    # The vote's argmax is the argmax of the max over exits.
    probs = jax.nn.softmax(logits, axis=-1)
    np.testing.assert_array_equal(jnp.argmax(combined, -1), jnp.argmax(jnp.max(probs, axis=0), -1))
    # Exits that agree: the vote is their distribution.
    same = jnp.broadcast_to(logits[:1], logits.shape)
    np.testing.assert_allclose(voting.vote(same), probs[0], rtol=1e-5, atol=1e-7)
    # A one-hot-confident exit wins.
    confident = logits.at[2, ..., 7].set(100.0)
    self.assertTrue(bool(jnp.all(jnp.argmax(voting.vote(confident), -1) == 7)))

  def test_choices_and_reports(self):
    ids = [3, 5, 8, 9]
    logits = jnp.full((3, 4, 12), -5.0)
    logits = logits.at[0, :, 3].set(2.0)  # exit 0 says class 0 everywhere, mildly
    logits = logits.at[1, 1, 8].set(9.0)  # exit 1 is sure of class 2 on question 1
    logits = logits.at[2, :, 9].set(1.0)
    single, voted = voting.choices(logits, ids)
    np.testing.assert_array_equal(single[0], [0, 0, 0, 0])
    np.testing.assert_array_equal(voted, [0, 2, 0, 0])
    report = voting.mc_report(logits, ids, [0, 2, 3, 0])
    self.assertEqual(report["vote_accuracy"], 0.75)
    self.assertEqual(report["per_exit_accuracy"], [0.5, 0.75, 0.25])
    self.assertEqual(report["best_exit_accuracy"], 0.75)
    self.assertGreaterEqual(report["vote_accuracy"], min(report["per_exit_accuracy"]))
    targets = jnp.asarray([[3, 8], [9, 9]])
    sums = voting.nll_sums(logits.reshape(3, 2, 2, 12), logits[0].reshape(2, 2, 12), targets, jnp.ones((2, 2)))
    ppl = voting.perplexities(jax.device_get(sums))
    self.assertLen(ppl["per_exit_ppl"], 3)
    self.assertEqual(ppl["final_ppl"], ppl["per_exit_ppl"][0])
    self.assertEqual(ppl["tokens"], 4)


if __name__ == "__main__":
  absltest.main()
