"""SparseGPT / Wanda / magnitude pruning and sequential calibration (Edge-LLM, issue 13)."""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax.compress import calibrate, prune
from lacax.model import llama
from lacax.model.config import ModelConfig

K, N, T = 160, 24, 400  # K > 128: a full block and a partial one


def _correlated(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(T, 12)) @ rng.normal(size=(12, K)) + 0.1 * rng.normal(size=(T, K))
  x = jnp.asarray(x, jnp.float32)
  return x, x.T @ x, jnp.asarray(rng.normal(size=(K, N)), jnp.float32)


def _reference_sparsegpt(w, gram, sparsity, n=0, m=0, block=128, damp=0.01):
  """IST-DASLab sparsegpt `fasterprune` in numpy float64 (rows = outputs), with lacax's exact per-block count
  round(s * numel) in place of the reference's `<= sort[int(s * numel)]` (which prunes one more)."""
  W = np.asarray(w, np.float64).T.copy()
  H = np.asarray(gram, np.float64).copy()
  cols = W.shape[1]
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  H += damp * np.mean(np.diag(H)) * np.eye(cols)
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
  for i1 in range(0, cols, block):
    i2 = min(i1 + block, cols)
    W1 = W[:, i1:i2].copy()
    Q1, Err1 = np.zeros_like(W1), np.zeros_like(W1)
    H1 = Hinv[i1:i2, i1:i2]
    if n == 0:
      tmp = W1 ** 2 / np.diag(H1)[None] ** 2
      k = int(round(sparsity * tmp.size))
      mask1 = np.zeros(tmp.size, bool)
      mask1[np.argsort(tmp.reshape(-1), kind="stable")[:k]] = True
      mask1 = mask1.reshape(tmp.shape)
    else:
      mask1 = np.zeros_like(W1, bool)
    for i in range(i2 - i1):
      if n and i % m == 0:
        tmp = W1[:, i:i + m] ** 2 / np.diag(H1)[i:i + m][None] ** 2
        idx = np.argsort(tmp, axis=1, kind="stable")[:, :n]
        np.put_along_axis(mask1[:, i:i + m], idx, True, axis=1)
      w_col = W1[:, i]
      q = np.where(mask1[:, i], 0.0, w_col)
      Q1[:, i] = q
      err = (w_col - q) / H1[i, i]
      W1[:, i:] -= err[:, None] * H1[i, i:][None]
      Err1[:, i] = err
    W[:, i1:i2] = Q1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  return W.T


class MatrixPruningTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x, cls.gram, cls.w = _correlated()

  @parameterized.parameters(0.3, 0.5)
  def test_sparsegpt_block_sparsity_and_reference(self, s):
    w_hat = np.asarray(prune.prune_matrix(self.w, self.gram, s, "sparsegpt"))
    zeros = w_hat == 0
    for i1 in (0, 128):
      block = zeros[i1:min(i1 + 128, K)]
      self.assertEqual(block.sum(), round(s * block.size), i1)           # exactly s inside each block
    ref = _reference_sparsegpt(self.w, self.gram, s)
    np.testing.assert_array_equal(zeros, ref == 0)
    np.testing.assert_allclose(w_hat, ref, rtol=1e-3, atol=2e-3 * np.abs(ref).max())

  @parameterized.parameters("sparsegpt", "wanda", "magnitude")
  def test_n_m_valid(self, method):
    w_hat = np.asarray(prune.prune_matrix(self.w, self.gram, 0.0, method, (2, 4)))
    per_group = (w_hat == 0).reshape(K // 4, 4, N).sum(axis=1)
    np.testing.assert_array_equal(per_group, 2)
    if method == "sparsegpt":
      ref = _reference_sparsegpt(self.w, self.gram, 0.0, n=2, m=4)
      np.testing.assert_array_equal(w_hat == 0, ref == 0)

  @parameterized.parameters("sparsegpt", "wanda", "magnitude")
  def test_zero_sparsity_is_identity(self, method):
    np.testing.assert_array_equal(np.asarray(prune.prune_matrix(self.w, self.gram, 0.0, method)),
                                  np.asarray(self.w))
    # The jitted kernels themselves, at a traced 0, too.
    if method == "sparsegpt":
      out = prune.sparsegpt(self.w, self.gram, jnp.float32(0.0))
      np.testing.assert_allclose(np.asarray(out), np.asarray(self.w), rtol=0, atol=0)

  @parameterized.parameters(0.3, 0.5, 0.7)
  def test_error_no_worse_than_magnitude(self, s):
    err = {m: prune.reconstruction_error(self.w, prune.prune_matrix(self.w, self.gram, s, m), self.gram)
           for m in prune.METHODS}
    self.assertLessEqual(err["sparsegpt"], err["magnitude"])
    direct = float(jnp.sum((self.x @ self.w - self.x @ prune.prune_matrix(self.w, self.gram, s, "magnitude")) ** 2))
    self.assertAlmostEqual(err["magnitude"] / direct, 1.0, places=3)

  def test_wanda_prunes_each_output_equally(self):
    w_hat = np.asarray(prune.prune_matrix(self.w, self.gram, 0.25, "wanda"))
    np.testing.assert_array_equal((w_hat == 0).sum(axis=0), K // 4)

  def test_bad_inputs_named(self):
    with self.assertRaisesRegex(ValueError, "method='obs'"):
      prune.prune_matrix(self.w, self.gram, 0.5, "obs")
    with self.assertRaisesRegex(ValueError, "sparsity=1.0"):
      prune.prune_matrix(self.w, self.gram, 1.0, "magnitude")
    with self.assertRaisesRegex(ValueError, r"nm=\(2, 3\)"):
      prune.prune_matrix(self.w, self.gram, 0.0, "wanda", (2, 3))


class SequentialTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2)
    cls.params = llama.init_params(cls.cfg, jax.random.PRNGKey(1), std=0.2)
    cls.tokens = np.random.default_rng(0).integers(0, 64, size=(2, 24))

  def test_layer_run_and_grams_are_the_forward(self):
    x, pos = calibrate.embed_inputs(self.params, self.cfg, self.tokens)
    out = llama.run(self.params, jnp.asarray(self.tokens), pos, None, self.cfg,
                    options=llama.ForwardOptions(hidden_layers=(1,), logits=False))
    layer0 = calibrate.layer_slice(self.params["layers"], 0)
    np.testing.assert_array_equal(np.asarray(calibrate.run_layer_jit(layer0, self.cfg, x, pos)),
                                  np.asarray(out.hidden[0]))
    grams = calibrate.layer_grams_jit(layer0, self.cfg, x, pos)
    h = llama.rms_norm(x, self.params["layers"]["attn_norm"][0], self.cfg.rms_norm_eps).reshape(-1, 32)
    np.testing.assert_allclose(np.asarray(grams["wq"]), np.asarray(h.T @ h), rtol=1e-4, atol=1e-4)
    self.assertEqual(grams["wo"].shape, (32, 32))
    self.assertEqual(grams["w_down"].shape, (64, 64))

  def test_calibrates_on_pruned_upstream_outputs(self):
    cfg, params = self.cfg, self.params
    pruned = prune.prune_layers(params, cfg, self.tokens, [0.5, 0.5], "sparsegpt", block_size=16)
    x, pos = calibrate.embed_inputs(params, cfg, self.tokens)
    layer0 = calibrate.layer_slice(pruned["layers"], 0)
    x1 = calibrate.run_layer_jit(layer0, cfg, x, pos)                      # pruned layer 0's outputs
    layer1 = calibrate.layer_slice(params["layers"], 1)
    expect = prune.prune_layer(layer1, calibrate.layer_grams_jit(layer1, cfg, x1, pos), 0.5, "sparsegpt",
                               block_size=16)
    for name in calibrate.PROJECTIONS:
      np.testing.assert_allclose(np.asarray(pruned["layers"][name][1]), np.asarray(expect[name][0]),
                                 rtol=1e-5, atol=1e-6, err_msg=name)
    # ...and not on the dense model's outputs.
    x1_dense = calibrate.run_layer_jit(calibrate.layer_slice(params["layers"], 0), cfg, x, pos)
    other = prune.prune_layer(layer1, calibrate.layer_grams_jit(layer1, cfg, x1_dense, pos), 0.5, "sparsegpt",
                              block_size=16)
    self.assertFalse(np.array_equal(np.asarray(other["w_down"][0]) == 0,
                                    np.asarray(pruned["layers"]["w_down"][1]) == 0))
    for name in calibrate.PROJECTIONS:
      self.assertAlmostEqual(float(jnp.mean(pruned["layers"][name] == 0)), 0.5, places=6)


try:
  import llmcompressor  # noqa: F401  pylint: disable=unused-import
  from llmcompressor.modifiers.pruning.sparsegpt import sgpt_sparsify
  from llmcompressor.modifiers.pruning.wanda import wanda_sparsify
  import torch
  _HAVE_LLMC = True
except ImportError:  # not a test dependency: it pins an older transformers (see the closing note)
  _HAVE_LLMC = False


@absltest.skipUnless(_HAVE_LLMC, "llmcompressor is not installed")
class LLMCompressorParityTest(parameterized.TestCase):
  """lacax against llmcompressor's SparseGPT / Wanda on the same weight and calibration inputs."""

  def _module(self, w):
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data = torch.tensor(np.asarray(w).T.copy())
    return lin

  @parameterized.parameters((0.5, 0, 0), (0.0, 2, 4))
  def test_sparsegpt(self, s, n, m):
    x, gram, w = _correlated(3)
    lin = self._module(w)
    h, _ = sgpt_sparsify.accumulate_hessian(torch.tensor(np.asarray(x))[None], lin,
                                            sgpt_sparsify.make_empty_hessian(lin), 0)
    _, theirs = sgpt_sparsify.sparsify_weight(lin, {lin: h}, s, n, m, 128, 0.01, False)
    theirs = theirs.detach().numpy().T
    ours = np.asarray(prune.prune_matrix(w, gram, s, "sparsegpt", (n, m) if n else None))
    err_ours, err_theirs = (prune.reconstruction_error(w, jnp.asarray(v), gram) for v in (ours, theirs))
    if n:
      np.testing.assert_array_equal(ours == 0, theirs == 0)
      np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())
    else:  # llmcompressor prunes one more weight per block (`<=` the sorted value at int(s * numel))
      self.assertEqual((theirs == 0).sum() - (ours == 0).sum(), 2)
      self.assertLess(abs(err_ours - err_theirs) / err_theirs, 0.05)

  @parameterized.parameters((0.5, 0, 0), (0.0, 2, 4))
  def test_wanda(self, s, n, m):
    x, gram, w = _correlated(4)
    lin = self._module(w)
    rows, _ = wanda_sparsify.accumulate_row_scalars(torch.tensor(np.asarray(x))[None], lin,
                                                    wanda_sparsify.make_empty_row_scalars(lin), 0)
    theirs = wanda_sparsify.sparsify_weight(lin, {lin: rows}, s, n, m).detach().numpy().T
    ours = np.asarray(prune.prune_matrix(w, gram, s, "wanda", (n, m) if n else None))
    np.testing.assert_array_equal(ours == 0, theirs == 0)
    np.testing.assert_array_equal(ours, theirs)


if __name__ == "__main__":
  absltest.main()
