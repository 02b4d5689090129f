"""SMoL gates and adapters (spec §5.4), balanced in-place distillation and sandwich sampling (spec §5.5)."""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import llama
from lacax.subnets import depth, distill, smol
from lacax.subnets.shape import SubnetSpace
from lacax.subnets.width import WidthMasks
from tests import subnet_models as sm

CFG = sm.CFG
L = CFG.num_layers
WIDTHS = (1.0, 0.875, 0.75, 0.625)


def _space(min_depth=5):
  F, KV, D = CFG.intermediate_size, CFG.num_kv_heads, CFG.hidden_size
  rng = np.random.RandomState(0)
  group = {w: np.ones((L, KV), bool) for w in WIDTHS}
  ffn = {}
  for w in WIDTHS:
    m = np.ones((L, F), bool)
    m[:, int(round(w * F)):] = False
    ffn[w] = m
  bias = {w: rng.randn(L, D).astype(np.float32) * 0.0 for w in WIDTHS}
  masks = WidthMasks(widths=WIDTHS, group_mask=group, ffn_mask=ffn, attn_bias=bias, ffn_bias=bias)
  return SubnetSpace(depth.drop_last_strategy(L, min_layers=min_depth), masks, WIDTHS, min_depth)


class SMoLTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg = smol.SMoLConfig(rank=4)
    cls.space = _space()
    init = jax.jit(lambda k: smol.init_smol(k, llama.param_shapes(CFG), L + len(WIDTHS), cls.cfg))
    cls.params = init(jax.random.PRNGKey(0))
    # B starts at zero; a perturbed copy makes every expert matter.
    rng = np.random.RandomState(3)
    cls.perturbed = jax.tree.map(lambda x: x + 0.1 * rng.randn(*x.shape).astype(np.float32), cls.params)
    cls.base = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.randn(*s.shape).astype(np.float32)),
                            llama.param_shapes(CFG))

  def test_gates_have_k_nonzeros_summing_to_one(self):
    router = self.params["router"]
    for i, shape in enumerate(self.space.grid()):
      enc = jnp.asarray(self.space.encoding(shape))
      for rng in (None, jax.random.PRNGKey(i)):
        g = np.asarray(smol.gates(router, enc, 2, rng))
        self.assertEqual(int(np.sum(g > 0)), 2)
        self.assertAlmostEqual(float(g.sum()), 1.0, places=6)
        self.assertTrue(np.all(g >= 0))
        # The two kept experts are the top-2 logits (noisy ones when rng is given).
        logits = np.asarray(smol.router_logits(router, enc, rng))
        self.assertEqual(set(np.flatnonzero(g)), set(np.argsort(-logits)[:2]))

  def test_evaluation_is_deterministic_and_training_is_noisy(self):
    enc = jnp.asarray(self.space.encoding(self.space.smallest))
    router = self.params["router"]
    g1, g2 = smol.gates(router, enc, 2), smol.gates(router, enc, 2)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
    noisy = [np.asarray(smol.gates(router, enc, 2, jax.random.PRNGKey(s))) for s in range(8)]
    self.assertTrue(any(np.abs(n - np.asarray(g1)).max() > 1e-4 for n in noisy))

  def test_gate_depends_only_on_the_shape_encoding_and_differs_across_shapes(self):
    router = self.params["router"]
    grid = self.space.grid()
    encs = {s: self.space.encoding(s) for s in grid}
    gates = {s: tuple(np.flatnonzero(np.asarray(smol.gates(router, jnp.asarray(e), 2)))) for s, e in encs.items()}
    self.assertGreater(len(set(gates.values())), 1)  # different shapes may pick different experts
    s = grid[3]
    again = self.space.shape(s.depth, s.width)
    self.assertEqual(gates[s], tuple(np.flatnonzero(np.asarray(smol.gates(router, jnp.asarray(
        self.space.encoding(again)), 2)))))

  def test_weight_space_mixing_and_merge_reproduce_the_adapter_forward(self):
    p = self.perturbed
    enc = jnp.asarray(self.space.encoding(self.space.largest))
    g = smol.gates(p["router"], enc, 2)
    adapter = smol.shape_adapter(p, enc, self.cfg)
    e = p["experts"]["w_up"]
    a_eff = sum(g[i] * e["a"][:, i] for i in range(5))
    b_eff = sum(g[i] * e["b"][:, i] for i in range(5))
    np.testing.assert_allclose(np.asarray(adapter["w_up"]["a"]), np.asarray(a_eff), atol=1e-6)
    x = jnp.asarray(np.random.RandomState(4).randn(3, CFG.hidden_size).astype(np.float32))
    base = self.base
    merged = smol.merge(base, adapter, self.cfg.scale)
    l = 2
    want = x @ base["layers"]["w_up"][l] + self.cfg.scale * (x @ a_eff[l]) @ b_eff[l]
    np.testing.assert_allclose(np.asarray(x @ merged["layers"]["w_up"][l]), np.asarray(want), atol=1e-5)
    # Weight-space mixing includes cross terms: it differs from the output-space mixture sum_i g_i B_i A_i x.
    output_space = sum(g[i] * (x @ e["a"][l, i]) @ e["b"][l, i] for i in range(5)) * self.cfg.scale
    self.assertGreater(float(jnp.abs(want - x @ base["layers"]["w_up"][l] - output_space).max()), 1e-4)
    # wo has two input axes: merged back into its [L, H, hd, D] layout.
    self.assertEqual(merged["layers"]["wo"].shape, base["layers"]["wo"].shape)

  def test_router_gets_a_gradient(self):
    p = self.perturbed
    enc = jnp.asarray(self.space.encoding(self.space.smallest))
    x = jnp.asarray(np.random.RandomState(4).randn(3, CFG.hidden_size).astype(np.float32))

    def loss(router):
      adapter = smol.mix(p["experts"], smol.gates(router, enc, 2, jax.random.PRNGKey(0)))
      return jnp.sum((x @ adapter["wq"]["a"][0] @ adapter["wq"]["b"][0].reshape(self.cfg.rank, -1)) ** 2)

    grads = jax.jit(jax.grad(loss))(p["router"])
    self.assertGreater(float(jnp.abs(grads["w2"]).max()), 0.0)
    self.assertGreater(float(jnp.abs(grads["w_noise"]).max()), 0.0)



class SMoLConfigTest(absltest.TestCase):

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, r"SMoLConfig.targets has unknown projection\(s\) \['qq'\]"):
      smol.SMoLConfig(targets=("q", "qq"))
    with self.assertRaisesRegex(ValueError, r"SMoLConfig.top_k=6 must be in \[1, num_experts=5\]"):
      smol.SMoLConfig(top_k=6)


class DistillTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.RandomState(0)
    self.tokens = jnp.asarray(rng.randint(0, 17, (2, 9)))  # targets (logits[:, t] predict tokens[:, t])
    self.mask = jnp.asarray(np.r_[np.zeros(3), np.ones(5), np.zeros(1)][None].repeat(2, 0))
    self.teacher = jnp.asarray(rng.randn(2, 9, 17).astype(np.float32))
    self.student = jnp.asarray(rng.randn(2, 9, 17).astype(np.float32))

  def test_balanced_value_equals_teacher_and_gradient_is_scaled(self):
    w = jnp.asarray(np.random.RandomState(5).randn(17, 17).astype(np.float32) * 0.3)

    def li(w):
      return distill.student_loss(self.student @ w, self.teacher, self.tokens, self.mask)

    def l1(w):
      return distill.next_token_ce(self.teacher @ w, self.tokens, self.mask)

    li_v, l1_v = li(w), l1(w)
    balanced = lambda w: distill.balance(li(w), l1(w))  # noqa: E731
    self.assertAlmostEqual(float(balanced(w)), float(l1_v), places=5)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(balanced))(w)),
                               np.asarray(l1_v / li_v * jax.jit(jax.grad(li))(w)), rtol=1e-5, atol=1e-7)
    total, raw = distill.sandwich_loss([self.teacher, self.student], self.tokens, self.mask, balancing=False)
    self.assertAlmostEqual(float(total), float(raw[0] + raw[1]), places=5)

  def test_no_gradient_through_the_teacher_and_zero_at_equality(self):
    g = jax.grad(lambda t: distill.soft_cross_entropy(self.student, t, self.mask))(self.teacher)
    self.assertEqual(float(jnp.abs(g).max()), 0.0)
    g = jax.grad(lambda s: distill.soft_cross_entropy(s, self.teacher, self.mask))(self.teacher)
    self.assertLess(float(jnp.abs(g).max()), 1e-7)

  def test_kd_averages_over_the_predicting_positions(self):
    p_t = jax.nn.softmax(self.teacher, -1)
    per = -jnp.sum(p_t * jax.nn.log_softmax(self.student, -1), -1)
    # Positions 3..7 predict counted targets; the reference's unshifted label mask takes positions 4..8.
    self.assertAlmostEqual(float(distill.soft_cross_entropy(self.student, self.teacher, self.mask)),
                           float(per[:, 3:8].mean()), places=5)
    self.assertAlmostEqual(float(distill.soft_cross_entropy(self.student, self.teacher, self.mask,
                                                            reference_kd_mask=True)),
                           float(per[:, 4:9].mean()), places=5)

  def test_sandwich_contents(self):
    space = _space(min_depth=5)
    rng = np.random.default_rng(0)
    seen_depths = set()
    for _ in range(200):
      shapes = distill.sandwich(rng, space)
      self.assertLen(shapes, 4)
      self.assertEqual(shapes[0], space.largest)
      self.assertEqual((shapes[0].depth, shapes[0].width), (L, 1.0))
      self.assertEqual(shapes[-1], space.smallest)
      self.assertEqual((shapes[-1].depth, shapes[-1].width), (5, 0.625))
      for s in shapes[1:3]:
        self.assertBetween(s.depth, 5, L - 1)
        seen_depths.add(s.depth)
      self.assertNotEqual(shapes[1].width, shapes[2].width)  # without replacement
    self.assertEqual(seen_depths, set(range(5, L)))  # full depth is never drawn at random
    with self.assertRaisesRegex(ValueError, r"num_random=5 exceeds the width grid's 4 values"):
      distill.sandwich(rng, space, num_random=5)

  def test_space_bad_input(self):
    space = _space(min_depth=5)
    with self.assertRaisesRegex(ValueError, r"width=0\.7 is not in the trained width grid \[1\.0, 0\.875"):
      space.shape(L, 0.7)
    with self.assertRaisesRegex(ValueError, r"depth=4 is out of range: trained depths are 5\.\.8"):
      space.shape(4, 1.0)
    with self.assertRaisesRegex(ValueError, r"depth=9 is out of range"):
      space.shape(9, 1.0)


class AmoebaDataTest(absltest.TestCase):

  def test_instruction_record_with_a_missing_field_is_named(self):
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top

    from lacax import train  # pylint: disable=g-import-not-at-top

    with tempfile.TemporaryDirectory() as d:
      path = os.path.join(d, "alpaca.jsonl")
      with open(path, "w") as f:
        f.write(json.dumps({"instruction": "Add 2 and 3.", "input": ""}) + "\n")
      # The amoeba job reads data.instructions with this loader (lacax/jobs/amoeba.py).
      with self.assertRaisesRegex(ValueError, r"alpaca\.jsonl, line 1.*'output'"):
        train.instruction_dataset(None, path, seq_len=32, batch_size=2)


if __name__ == "__main__":
  absltest.main()
