"""Passkey / NIAH prompt generator: needle placement, lengths on the grid, determinism and scoring."""

import functools
import random
import re

from absl.testing import absltest
from absl.testing import parameterized

from lacax.eval import passkey as pk


def word_tokenize(text):
  """A deterministic stand-in tokenizer: one id per whitespace-separated word, plus a BOS id."""
  return [1] + [len(w) + 2 for w in text.split()]


def char_tokenize(text):
  return [ord(c) for c in text]


class PasskeyTest(parameterized.TestCase):

  def test_reference_prompt_layout(self):
    # n = 180 filler characters (one PASSKEY_FILLER_UNIT), needle after k = 20 ("The grass is green. ").
    sample = pk.passkey_sample(180, seed=3, prefix_chars=20)
    passkey = random.Random(3).randint(1, 99999)
    self.assertEqual(sample.answer, str(passkey))
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    expected = "\n".join([pk.PASSKEY_TASK_DESCRIPTION, "The grass is green. ", needle,
                          pk.PASSKEY_FILLER_UNIT[:180 - 20],  # the reference restarts the filler after the needle
                          "What is the pass key? The pass key is"])
    self.assertEqual(sample.prompt, expected)
    self.assertEqual(sample.needle, needle)
    self.assertEqual(sample.needle_offset, len(pk.PASSKEY_TASK_DESCRIPTION) + 1 + 20 + 1)
    self.assertEqual((sample.prefix_chars, sample.filler_chars, sample.seed), (20, 180, 3))
    self.assertAlmostEqual(sample.depth, 20 / 180)

  @parameterized.parameters(0.0, 0.1, 0.25, 0.5, 0.9, 1.0)
  def test_needle_is_where_the_generator_says(self, depth):
    n = 3072
    sample = pk.passkey_sample(n, seed=11, depth=depth)
    k = round(depth * n)
    self.assertEqual(sample.prefix_chars, k)
    self.assertAlmostEqual(sample.depth, k / n)
    self.assertEqual(sample.prompt[sample.needle_offset:sample.needle_offset + len(sample.needle)], sample.needle)
    self.assertEqual(sample.prompt.count(sample.needle), 1)
    # Exactly k filler characters sit between the description line and the needle.
    before = sample.prompt[:sample.needle_offset]
    self.assertEqual(before, pk.PASSKEY_TASK_DESCRIPTION + "\n" + pk.filler_text(k) + "\n")
    # The filler before plus after the needle totals n characters.
    after = sample.prompt[sample.needle_offset + len(sample.needle) + 1:]
    self.assertEqual(after, pk.filler_text(n - k) + "\n" + pk.PASSKEY_QUESTION)

  def test_continue_mode_is_a_contiguous_haystack(self):
    sample = pk.passkey_sample(500, seed=0, prefix_chars=123, suffix_mode="continue")
    filler = sample.prompt[len(pk.PASSKEY_TASK_DESCRIPTION) + 1:-len(pk.PASSKEY_QUESTION) - 1]
    self.assertEqual(filler.replace("\n" + sample.needle + "\n", ""), pk.filler_text(500))

  def test_prompt_lengths_on_the_reference_grid(self):
    # niah/pred.py defaults (max_tokens 4096, interval 2948): 3.75 * 2948 = 11055 -> // 1024 = 10 -> 10240.
    self.assertEqual(pk.reference_filler_lengths(), [10240])
    # interval 1024: 3.75 * 1024 * (p + 1) // 1024 * 1024 = floor(3.75 (p + 1)) * 1024 = 3, 7, 11, 15 KiB.
    self.assertEqual(pk.reference_filler_lengths(4096, 1024), [3072, 7168, 11264, 15360])
    # n = 10240: step 1024 -> 11 positions 0..10240. n = 3072: step 307 -> 0, 307, ..., 3070 (11 positions).
    self.assertEqual(pk.reference_prefix_grid(10240), list(range(0, 10241, 1024)))
    self.assertEqual(pk.reference_prefix_grid(3072)[-1], 3070)
    self.assertLen(pk.reference_prefix_grid(3072), 11)
    # max_tokens = interval = 2048: one point, 3.75 * 2048 = 7680 // 1024 = 7 -> 7168 characters; step
    # 7168 // 10 = 716 -> positions 0, 716, ..., 7160 (11), each with seeds 0 and 1.
    samples = list(pk.reference_passkey_grid(2048, 2048, num_tests=2))
    self.assertLen(samples, 22)
    fixed = len(pk.PASSKEY_TASK_DESCRIPTION) + len(pk.PASSKEY_QUESTION) + 4  # 4 newlines
    for s in samples:
      self.assertEqual(s.filler_chars, 7168)
      self.assertEqual(len(s.prompt), fixed + 7168 + len(s.needle))
      self.assertEqual(s.prompt[s.needle_offset:s.needle_offset + len(s.needle)], s.needle)
    self.assertEqual([s.prefix_chars for s in samples[::2]], list(range(0, 7161, 716)))
    self.assertEqual([s.seed for s in samples[:4]], [0, 1, 0, 1])

  def test_determinism_by_seed(self):
    a = pk.passkey_sample(1000, seed=42, depth=0.5)
    b = pk.passkey_sample(1000, seed=42, depth=0.5)
    self.assertEqual(a, b)
    self.assertEqual(a.answer, str(random.Random(42).randint(1, 99999)))
    keys = {pk.draw_passkey(seed) for seed in range(50)}
    self.assertGreater(len(keys), 45)  # different seeds give different keys
    self.assertTrue(all(1 <= k <= 99999 for k in keys))
    state = random.getstate()
    pk.passkey_sample(100, seed=1, depth=0.3)
    self.assertEqual(random.getstate(), state)  # the global RNG is untouched

  def test_score_passkey(self):
    self.assertTrue(pk.score_passkey(" 50495.", "50495"))
    self.assertFalse(pk.score_passkey("5049", "50495"))
    self.assertTrue(pk.score_passkey("123456", "2345"))  # substring test, as in the reference
    self.assertEqual(pk.pass_rate(["the key is 7", "8", "x"], ["7", "7", "x"]), 2 / 3)
    with self.assertRaisesRegex(ValueError, "2 outputs but 1 answers"):
      pk.pass_rate(["a", "b"], ["a"])

  @parameterized.named_parameters(
      ("both", dict(depth=0.5, prefix_chars=3), "exactly one of depth and prefix_chars"),
      ("neither", dict(), "exactly one of depth and prefix_chars"),
      ("depth_range", dict(depth=1.5), r"depth must be a fraction in \[0, 1\], got 1.5"),
      ("prefix_range", dict(prefix_chars=101), r"prefix_chars must be an integer in \[0, filler_chars=100\]"),
      ("unit", dict(depth=0.5, depth_unit="words"), "depth_unit must be one of"),
      ("tokens_need_tokenizer", dict(depth=0.5, depth_unit="tokens"), "needs a tokenize callable"),
      ("suffix_mode", dict(depth=0.5, suffix_mode="wrap"), "suffix_mode must be one of"),
  )
  def test_validation(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      pk.passkey_sample(100, seed=0, **kwargs)


class TokenModesTest(parameterized.TestCase):

  @parameterized.parameters(0.0, 0.3, 0.5, 1.0)
  def test_token_depth(self, depth):
    n = 1800  # 10 filler units = 380 words
    sample = pk.passkey_sample(n, seed=5, depth=depth, depth_unit="tokens", tokenize=word_tokenize)
    total = len(pk.filler_text(n).split())
    prefix_words = len(pk.filler_text(sample.prefix_chars).split())
    # The prefix is the longest one with at most round(depth * total) words (BOS excluded on both sides).
    self.assertEqual(prefix_words, round(depth * total))
    # ... and the longest: one more character starts another word.
    self.assertGreater(len(pk.filler_text(sample.prefix_chars + 1).split()), round(depth * total))
    self.assertAlmostEqual(sample.depth, prefix_words / total)
    self.assertEqual(sample.depth_unit, "tokens")
    self.assertEqual(sample.prompt[sample.needle_offset:].split("\n")[0], sample.needle)

  @parameterized.parameters(300, 1000, 4096)
  def test_fit_to_token_budget(self, target):
    sample = pk.passkey_sample_for_tokens(target, char_tokenize, seed=9, depth=0.5)
    # Character "tokens": the prompt is fixed text + needle + n filler chars, so the fit is exact.
    self.assertEqual(len(sample.prompt), target)
    self.assertEqual(sample.num_tokens, target)
    words = pk.passkey_sample_for_tokens(target, word_tokenize, seed=9, depth=0.5)
    self.assertLessEqual(words.num_tokens, target)
    self.assertEqual(words.num_tokens, len(word_tokenize(words.prompt)))
    longer = pk.passkey_sample(words.filler_chars + 1, seed=9, depth=0.5)
    self.assertGreater(len(word_tokenize(longer.prompt)), target)  # one more filler character would not fit

  def test_fit_too_small(self):
    with self.assertRaisesRegex(ValueError, "below the .* tokens of the prompt without filler"):
      pk.passkey_sample_for_tokens(10, char_tokenize, seed=0, depth=0.5)

  def test_token_grid(self):
    samples = list(pk.token_passkey_grid([300, 600], [0.0, 1.0], [0, 1], char_tokenize))
    self.assertLen(samples, 8)
    self.assertEqual([len(s.prompt) for s in samples], [300] * 4 + [600] * 4)
    self.assertEqual([s.prefix_chars == 0 for s in samples[:4]], [True, True, False, False])
    self.assertEqual(pk.depth_grid(), [i / 10 for i in range(11)])


class GenericNiahTest(absltest.TestCase):

  def test_custom_needle(self):
    haystack = "Paul wrote an essay about startups. "
    sample = pk.niah_sample(
        360, needle="The best thing to do in San Francisco is eat a sandwich.", answer="eat a sandwich",
        question="What is the best thing to do in San Francisco?", depth=0.25, haystack=haystack,
        task_description=None, separator=" ")
    # No description line: the prompt starts with the haystack; 90 characters (2.5 copies) precede the needle.
    self.assertEqual(sample.prefix_chars, 90)
    self.assertEqual(sample.needle_offset, 91)
    self.assertTrue(sample.prompt.startswith(haystack * 2 + haystack[:18] + " The best thing"))
    self.assertEqual(sample.prompt[sample.needle_offset:].split(".")[0],
                     "The best thing to do in San Francisco is eat a sandwich")
    # "continue" (the default here) keeps the haystack contiguous: 360 chars = 10 copies in total.
    self.assertEqual(sample.prompt.replace(" " + sample.needle, "").count("Paul"), 10)
    self.assertIsNone(sample.seed)

  def test_fit_generic(self):
    make = functools.partial(pk.niah_sample, needle="N.", answer="N", question="Q?", depth=0.5, haystack="ab ")
    sample = pk.fit_to_tokens(make, 50, char_tokenize)
    self.assertEqual(len(sample.prompt), 50)
    self.assertIsNotNone(re.search(r"\nN\.\n", sample.prompt))


if __name__ == "__main__":
  absltest.main()
