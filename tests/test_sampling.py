"""`lacax.sampling.sample` draws from the distribution `filter_logits` states (temperature, top-k, top-p).

The fast top-p path (the nucleus read off the most likely `TOP_P_CANDIDATES` tokens) keeps exactly the tokens
the whole-vocabulary sort keeps, and falls back when the candidates do not cover top_p or the threshold is tied
with a token outside them; the fallback's sort-free bisection (`nucleus_mask`) keeps exactly the sort's tokens
too; the inverse-CDF draw never returns a filtered token and its frequencies match the filtered softmax.
"""

from __future__ import annotations

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax import sampling
from lacax.sampling import SamplingConfig

V = 700  # more than TOP_P_CANDIDATES, so the candidates are a real subset


def logits_of(kind: str) -> jax.Array:
  rng = np.random.RandomState(0)
  if kind == "peaked":
    x = rng.randn(4, V) * 2.0
    x[:, :5] += 12.0  # the nucleus is a handful of tokens
  elif kind == "flat":
    x = rng.randn(4, V) * 0.1  # the nucleus is most of the vocabulary
  else:  # "tie": the threshold value repeats beyond the candidates
    x = np.full((4, V), -5.0)
    x[:, :3] = [4.0, 3.0, 2.0]
    x[:, 3:] = -1.0
  return jnp.asarray(x, jnp.float32)


class SampleTest(parameterized.TestCase):

  @parameterized.product(kind=("peaked", "flat", "tie"), top_k=(0, 40))
  def test_nucleus_equals_the_whole_vocabulary_sort(self, kind, top_k):
    cfg = SamplingConfig(temperature=0.7, top_k=top_k, top_p=0.9)
    logits = logits_of(kind)
    want = np.asarray(sampling.filter_logits(logits, cfg)) > jnp.finfo(jnp.float32).min
    scaled = sampling.filter_logits(logits, SamplingConfig(temperature=0.7, top_k=top_k))
    ids, weights, decided = sampling._nucleus_of_candidates(scaled, 0.9)  # pylint: disable=protected-access
    expect_fast = kind == "peaked" or (top_k == 40 and kind != "tie")
    self.assertEqual(bool(decided), expect_fast)
    if decided:
      got = np.zeros_like(want)
      np.put_along_axis(got, np.asarray(ids), np.asarray(weights) > 0, axis=-1)
      np.testing.assert_array_equal(got, want)

  @parameterized.product(kind=("peaked", "flat", "tie", "mixed"), top_k=(0, 40), top_p=(0.3, 0.9, 0.999))
  def test_bisection_nucleus_equals_the_sort(self, kind, top_k, top_p):
    logits = logits_of(kind) if kind != "mixed" else jnp.concatenate([logits_of("peaked")[:2],
                                                                      logits_of("flat")[:1], logits_of("tie")[:1]])
    if kind == "flat":  # far from the thresholds' rounding: distinct, spread logits
      logits = logits * 20.0
    cfg = SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p)
    want = np.asarray(sampling.filter_logits(logits, cfg)) > jnp.finfo(jnp.float32).min
    scaled = sampling.filter_logits(logits, SamplingConfig(temperature=0.7, top_k=top_k))
    np.testing.assert_array_equal(np.asarray(sampling.nucleus_mask(scaled, top_p)), want)

  def test_order_key_orders_floats(self):
    x = jnp.asarray([-jnp.inf, jnp.finfo(jnp.float32).min, -2.5, -1e-30, -0.0, 0.0, 1e-30, 3.0, jnp.inf])
    keys = np.asarray(sampling._order_key(x)).astype(np.int64)  # pylint: disable=protected-access
    self.assertTrue(np.all(np.diff(keys) >= 0))
    back = sampling._from_order_key(sampling._order_key(x))  # pylint: disable=protected-access
    np.testing.assert_array_equal(back, x)

  @parameterized.product(kind=("peaked", "flat", "tie"), top_p=(0.9, 1.0))
  def test_draws_follow_the_filtered_softmax(self, kind, top_p):
    cfg = SamplingConfig(temperature=0.7, top_p=top_p)
    logits = logits_of(kind)[:1]
    probs = np.asarray(jax.nn.softmax(sampling.filter_logits(logits, cfg), axis=-1))[0]
    n = 20000
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sampling.sample(logits, k, cfg)[0]))(
        jax.random.split(jax.random.PRNGKey(1), n)))
    self.assertTrue(np.all(probs[draws] > 0), "a filtered token was drawn")
    freq = np.bincount(draws, minlength=V) / n
    self.assertLess(float(np.max(np.abs(freq - probs))), 0.015)

  def test_inverse_cdf_skips_zero_weights(self):
    w = jnp.asarray([[0.0, 1.0, 0.0, 0.0, 3.0, 0.0]] * 3)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    got = np.asarray(jax.vmap(lambda k: sampling.inverse_cdf(w, k))(keys)).ravel()
    self.assertEqual(set(got.tolist()), {1, 4})
    self.assertAlmostEqual(float(np.mean(got == 4)), 0.75, delta=0.02)

  def test_greedy_and_seeded_repeats(self):
    logits = logits_of("peaked")
    np.testing.assert_array_equal(sampling.sample(logits, jax.random.PRNGKey(0), SamplingConfig()),
                                  np.argmax(np.asarray(logits), -1))
    cfg = SamplingConfig(temperature=1.0, top_p=0.95)
    a = sampling.sample(logits, jax.random.PRNGKey(7), cfg)
    np.testing.assert_array_equal(a, sampling.sample(logits, jax.random.PRNGKey(7), cfg))

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_greedy_ids_equal_argmax_with_ties_infinities_and_nan(self, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 1000)).astype(np.float32)
    x[1, [5, 900]] = 50.0  # a tie: the first
    x[2, [7, 300]] = np.nan  # NaN wins, the first one
    x[2, 8] = np.inf
    x[3, :] = -np.inf  # nothing finite: index 0
    x[4, 999] = np.inf  # at the end
    x[5, 0] = 50.0  # at the start
    logits = jnp.asarray(x).astype(dtype)
    got = jax.jit(sampling.greedy_ids)(logits)
    self.assertEqual(got.dtype, jnp.int32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(logits, axis=-1)))
    np.testing.assert_array_equal(np.asarray(got)[:5], [np.argmax(x[0]), 5, 7, 0, 999])
    hlo = jax.jit(sampling.greedy_ids).lower(logits).as_text()
    self.assertNotIn("argmax", hlo)


if __name__ == "__main__":
  absltest.main()
