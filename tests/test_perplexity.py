"""Streaming perplexity and evaluation texts."""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from lacax.cache.full import FullPolicy
from lacax.eval import perplexity
from lacax.eval import texts
from tests.test_policies import tiny_model


class StreamingPerplexityTest(absltest.TestCase):

  def test_full_cache_stream_equals_one_teacher_forced_forward(self):
    cfg, params = tiny_model(4)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 97))
    reference = perplexity.teacher_forced_nll(params, cfg, tokens)
    result = perplexity.streaming_nll(params, cfg, tokens, FullPolicy(), chunk=40)  # 96 steps: a padded chunk
    self.assertEqual(result.nll.shape, (2, 96))
    np.testing.assert_allclose(result.nll, reference, atol=2e-5, rtol=0)
    self.assertAlmostEqual(result.ppl, float(np.exp(reference.mean())), places=3)
    curve = result.running_ppl()
    self.assertAlmostEqual(float(curve[-1]), result.ppl, places=3)
    self.assertAlmostEqual(float(curve[0]), float(np.exp(reference[:, 0].mean())), places=3)

  def test_too_short_text_is_rejected(self):
    cfg, params = tiny_model(4)
    with self.assertRaisesRegex(ValueError, "at least 2 tokens, got 1"):
      perplexity.streaming_nll(params, cfg, np.array([3]), FullPolicy())


class TextsTest(absltest.TestCase):

  def test_default_text_is_long_english_prose(self):
    text = texts.load_text()
    self.assertGreater(len(text), 400_000)  # ~100k tokens: enough for 32k-token streams
    self.assertIn("the", text.split()[:2000])

  def test_file_folder_and_jsonl(self):
    root = tempfile.mkdtemp()
    with open(os.path.join(root, "b.txt"), "w") as f:
      f.write("second")
    with open(os.path.join(root, "a.txt"), "w") as f:
      f.write("first")
    self.assertEqual(texts.load_text(root), "first\n\nsecond")
    self.assertEqual(texts.load_text(os.path.join(root, "a.txt")), "first")
    jsonl = os.path.join(root, "d.jsonl")
    with open(jsonl, "w") as f:
      f.write(json.dumps({"text": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    with self.assertRaisesRegex(ValueError, r"d\.jsonl, line 2: missing field 'text'"):
      texts.load_text(jsonl)
    with self.assertRaisesRegex(FileNotFoundError, "data.path='/nope'"):
      texts.load_text("/nope")


if __name__ == "__main__":
  absltest.main()
