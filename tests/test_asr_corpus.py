"""The offline speech corpus: deterministic bytes, order independence, splits by text, manifests."""

import hashlib
import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from lacax.asr import audio as audio_lib
from lacax.asr import corpus
from lacax.asr import espeak

CFG = corpus.CorpusConfig(languages=("de", "fr", "ru"), num_train=3, num_dev=1, num_test=1,
                          overrides=(("ru", (2, 0, 1)),), max_seconds=10.0)


def digest(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


class CorpusTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp()
    cls.built = corpus.build(CFG, cls.root)

  def test_same_bytes_twice_and_cached(self):
    other = tempfile.mkdtemp()
    again = corpus.build(CFG, other)
    self.assertEqual(digest(self.root), digest(other))
    self.assertEqual(again["synthesized"], 13)  # de 5, fr 5, ru 3
    cached = corpus.build(CFG, other)
    self.assertEqual((cached["synthesized"], cached["cached"]), (0, 13))
    self.assertEqual(digest(self.root), digest(other))

  def test_order_independent_synthesis(self):
    rows = corpus.read_manifest(self.built["manifests"]["train"])
    last = rows[-1]
    item = [x for x in corpus.plan(CFG)["train"] if x["text"] == last["text"]][0]
    with espeak.EspeakServer() as server:  # a fresh engine that spoke nothing else first
      samples, rate = server.synthesize(item["text"], item["voice"])
    wav = audio_lib.resample(samples.astype(np.float32) / 32768.0, rate)
    np.testing.assert_allclose(audio_lib.load(last["path"]), np.round(np.clip(wav, -1, 1) * 32767) / 32768,
                               atol=1e-7)

  def test_manifests_splits_and_format(self):
    splits = {s: corpus.read_manifest(p) for s, p in self.built["manifests"].items()}
    self.assertEqual([len(splits[s]) for s in corpus.SPLITS], [8, 2, 3])
    texts = [set(r["text"] for r in splits[s]) for s in corpus.SPLITS]
    self.assertFalse(texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    self.assertEqual({r["language"] for r in splits["train"]}, {"de", "fr", "ru"})
    with open(self.built["manifests"]["train"], encoding="utf-8") as f:
      first = json.loads(f.readline())
    self.assertEqual(set(first), {"path", "text", "language", "duration", "voice"})
    self.assertFalse(os.path.isabs(first["path"]))
    wav = audio_lib.load(splits["train"][0]["path"])
    self.assertAlmostEqual(len(wav) / 16000, splits["train"][0]["duration"], places=4)
    self.assertGreater(np.abs(wav).max(), 0.05)
    self.assertTrue(any("ы" in r["text"] or "и" in r["text"] for r in splits["train"] if r["language"] == "ru"))

  def test_real_recordings_load_the_same_way(self):
    import soundfile  # pylint: disable=g-import-not-at-top
    d = tempfile.mkdtemp()
    soundfile.write(os.path.join(d, "rec.flac"), np.zeros((44100, 2), np.float32) + 0.1, 44100)
    with open(os.path.join(d, "m.jsonl"), "w") as f:
      f.write(json.dumps({"path": "rec.flac", "text": "Hallo Welt!", "language": "de"}) + "\n")
    rows = corpus.read_manifest(os.path.join(d, "m.jsonl"))
    self.assertEqual(rows[0]["text"], "hallo welt")
    self.assertEqual(audio_lib.load(rows[0]["path"]).shape, (16000,))
    with open(os.path.join(d, "bad.jsonl"), "w") as f:
      f.write(json.dumps({"path": "rec.flac", "language": "de"}) + "\n")
    with self.assertRaisesRegex(ValueError, r"bad.jsonl:1: missing fields \['text'\]"):
      corpus.read_manifest(os.path.join(d, "bad.jsonl"))

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "overrides names languages"):
      corpus.CorpusConfig(languages=("de",), overrides=(("fr", (1, 1, 1)),))
    with self.assertRaisesRegex(ValueError, "no voice 'zz'"):
      with espeak.EspeakServer() as server:
        server.synthesize("hallo", espeak.Voice("zz"))


if __name__ == "__main__":
  absltest.main()
