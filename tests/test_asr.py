"""Master-ASR and the speech stack: masks, STE, schedules, stage 2, accounting, frontend, CTC, metrics, inputs."""

import dataclasses
import io
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lacax import train as train_lib
from lacax.asr import artisan
from lacax.asr import audio as audio_lib
from lacax.asr import ctc
from lacax.asr import data as data_lib
from lacax.asr import frontend
from lacax.asr import inference
from lacax.asr import master_asr
from lacax.asr import model
from lacax.asr import vocab as vocab_lib

ENC = model.EncoderConfig(d_model=32, num_layers=2, num_heads=4, ffn_dim=64, subsample_dim=32, n_mels=16,
                          pos_conv_kernel=8, pos_conv_groups=4, vocab_size=9)


def numpy_mask(scores, row, sparsity):
  """Eq. 1-2 in NumPy: gates from sign(T) (argmax if empty), sum, exact top-k with lower index first."""
  gates = (row > 0).astype(np.float64)
  if not gates.any():
    gates = np.eye(len(row))[np.argmax(row)]
  s = np.tensordot(gates, scores, axes=(0, 0)).reshape(-1)
  keep = artisan.keep_count(s.size, sparsity)
  order = np.argsort(-s, kind="stable")[:keep]
  out = np.zeros(s.size)
  out[order] = 1
  return out.reshape(scores.shape[1:])


def tiny_batch(rng, lang=0, batch=4, frames=40):
  feats = rng.standard_normal((batch, frames, ENC.n_mels)).astype(np.float32)
  frame_mask = np.ones((batch, frames), np.float32)
  frame_mask[1, 30:] = 0
  labels = rng.integers(1, ENC.vocab_size, (batch, 5)).astype(np.int32)
  label_mask = np.ones((batch, 5), np.float32)
  label_mask[2, 3:] = 0
  return {"feats": feats, "frame_mask": frame_mask, "labels": labels, "label_mask": label_mask,
          "lang": np.int32(lang)}


class MaskTest(parameterized.TestCase):

  @parameterized.parameters((0.3, 20), (0.5, 7), (0.1, 1))
  def test_exact_count_and_numpy_reference(self, sparsity, seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, (3, 6, 5)).astype(np.float32)  # small integers: many ties
    for row in ([1.0, -1.0, 2.0], [-1.0, 0.5, -2.0], [-3.0, -1.0, -2.0]):
      row = np.asarray(row, np.float32)
      mask = np.asarray(artisan.artisan_mask(jnp.asarray(scores), artisan.selection_gates(jnp.asarray(row)),
                                             sparsity))
      self.assertEqual(int(mask.sum()), artisan.keep_count(30, sparsity))
      self.assertEqual(artisan.keep_count(30, sparsity), int(np.ceil(round((1 - sparsity) * 30, 9))))
      np.testing.assert_array_equal(mask, numpy_mask(scores, row, sparsity))

  def test_topk_mask_equals_lax_top_k_on_signed_scores_and_ties(self):
    rng = np.random.default_rng(4)
    for scores in (rng.standard_normal((40, 33)), np.round(rng.standard_normal((40, 33)) * 2) / 2,
                   np.concatenate([[-0.0, 0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38], rng.standard_normal(93)])):
      flat = jnp.asarray(scores, jnp.float32).reshape(-1)
      for keep in (1, 7, flat.size // 2, flat.size - 1, flat.size):
        _, idx = jax.lax.top_k(jnp.where(flat == 0, 0.0, flat), keep)
        want = np.zeros(flat.size)
        want[np.asarray(idx)] = 1
        np.testing.assert_array_equal(np.asarray(artisan.topk_hard(flat, keep)), want, err_msg=f"keep={keep}")

  def test_same_row_same_mask_different_subsets_differ(self):
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.standard_normal((4, 16, 16)), jnp.float32)
    a = artisan.selection_gates(jnp.array([1.0, -1.0, 1.0, -1.0]))
    b = artisan.selection_gates(jnp.array([-1.0, 1.0, -1.0, 1.0]))
    m1, m2 = artisan.artisan_mask(scores, a, 0.3), artisan.artisan_mask(scores, a, 0.3)
    np.testing.assert_array_equal(m1, m2)
    self.assertFalse(np.array_equal(m1, artisan.artisan_mask(scores, b, 0.3)))

  def test_empty_selection_falls_back_to_argmax(self):
    rng = np.random.default_rng(1)
    scores = jnp.asarray(rng.standard_normal((3, 8, 8)), jnp.float32)
    empty = artisan.artisan_mask(scores, artisan.selection_gates(jnp.array([-2.0, -0.5, -1.0])), 0.3)
    single = artisan.artisan_mask(scores, jnp.array([0.0, 1.0, 0.0]), 0.3)
    np.testing.assert_array_equal(empty, single)
    self.assertEqual(int(empty.sum()), artisan.keep_count(64, 0.3))

  def test_ste_gradients_reach_scores_and_rows(self):
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
    scores = jnp.asarray(np.abs(rng.standard_normal((3, 8, 8))), jnp.float32)
    row = jnp.array([0.3, -0.2, 0.1])
    x = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)

    def loss(scores, row):
      mask = artisan.artisan_mask(scores, artisan.selection_gates(row), 0.3)
      return jnp.sum((x @ (w * mask))**2)

    gs, gr = jax.grad(loss, argnums=(0, 1))(scores, row)
    for g in (gs, gr):
      self.assertTrue(np.all(np.isfinite(g)))
      self.assertGreater(float(jnp.abs(g).max()), 0.0)
    # The STE passes d loss / d mask straight to the specialists that are selected (rows 0 and 2).
    dmask = jax.grad(lambda m: jnp.sum((x @ (w * m))**2))(artisan.artisan_mask(scores, jnp.array([1., 0, 1]), .3))
    np.testing.assert_allclose(gs[0], dmask, rtol=1e-5, atol=1e-5 * float(jnp.abs(dmask).max()))  # ulps of the largest
    np.testing.assert_allclose(gs[1], 0.0 * dmask)

  def test_diversity_guard(self):
    w = jax.random.normal(jax.random.PRNGKey(0), (1, 48, 48))

    def jaccard(noise):
      scores = artisan.init_scores(jax.random.PRNGKey(1), w, 4, noise)[0]
      masks = [np.asarray(artisan.artisan_mask(scores, jnp.eye(4)[k], 0.3)) > 0 for k in range(4)]
      return max((masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
                 for i in range(4) for j in range(i + 1, 4))

    self.assertLess(jaccard(1.0), 0.9)  # the specified initialisation keeps specialists distinct
    self.assertEqual(jaccard(0.0), 1.0)  # |W| without noise: every selection gives the same mask (the collapse)


class ScheduleTest(absltest.TestCase):

  def test_select_every_beta_phases_and_alpha(self):
    mc = artisan.MaskConfig(kind="artisan", num_languages=2, num_specialists=3)
    params = model.init_params(jax.random.PRNGKey(0), ENC, mc)
    sched = master_asr.ScheduleConfig(lr=1e-3, steps=100, warmup=0.0, hold=1.0, select_every=5, phase_every=3,
                                      clip=0.0)
    opt = master_asr.stage1_optimizer("master_asr", sched)
    labels = master_asr.labels_for(params, master_asr.trainable_groups("master_asr"))
    loss_fn = master_asr.stage1_loss(master_asr.LossConfig(ENC, mc, None))
    state = train_lib.create_train_state(params, opt, labels=labels)
    step = train_lib.make_train_step(loss_fn, opt, labels=labels, donate=False)
    rng = np.random.default_rng(0)
    for s in range(8):
      new, _ = step(state, tiny_batch(rng, lang=s % 2))
      old_p, new_p = state.params, new.params
      changed = lambda f: not np.array_equal(f(old_p), f(new_p))
      sel = changed(lambda p: p["masks"]["q"]["select"])
      self.assertEqual(sel, s % 5 == 0, f"selection rows at step {s}")
      self.assertEqual(changed(lambda p: p["layers"]["fc1"]["kernel"]), (s // 3) % 2 == 0, f"W at step {s}")
      self.assertEqual(changed(lambda p: p["masks"]["k"]["scores"]), (s // 3) % 2 == 1, f"M at step {s}")
      self.assertTrue(changed(lambda p: p["head"]["kernel"]), f"head at step {s}")
      if s == 0:  # Adam's first step moves each entry by ~lr * sign(g): alpha x larger for T
        dt = np.abs(np.asarray(new_p["masks"]["q"]["select"] - old_p["masks"]["q"]["select"])).max()
        dh = np.abs(np.asarray(new_p["head"]["kernel"] - old_p["head"]["kernel"])).max()
        self.assertAlmostEqual(dt / dh, sched.select_lr_mult, delta=0.05)
      state = new

  def test_tri_stage(self):
    s = master_asr.tri_stage(master_asr.ScheduleConfig(lr=1.0, steps=100, warmup=0.1, hold=0.4,
                                                       init_scale=0.01, final_scale=0.05))
    self.assertAlmostEqual(float(s(0)), 0.01, places=5)
    self.assertAlmostEqual(float(s(30)), 1.0, places=5)
    self.assertAlmostEqual(float(s(100)), 0.05, places=4)


class Stage2Test(parameterized.TestCase):

  @parameterized.parameters("master_asr", "adapters", "s3router")
  def test_old_languages_bit_identical_and_only_new_leaves_train(self, method):
    enc = dataclasses.replace(ENC, adapter_dim=8, adapter_languages=2) if method == "adapters" else ENC
    kind = {"master_asr": "artisan", "s3router": "s3router"}.get(method, "none")
    mc = artisan.MaskConfig(kind=kind, num_languages=2, num_specialists=3)
    params = model.init_params(jax.random.PRNGKey(0), enc, mc)
    lc = master_asr.LossConfig(enc, mc, None)
    rng = np.random.default_rng(0)
    probe = tiny_batch(rng)
    before = [np.asarray(model.logits(params, probe["feats"], probe["frame_mask"], enc, mc, l)[0]) for l in (0, 1)]
    tree, labels, lc2, lang = master_asr.new_language(jax.random.PRNGKey(3), method, params, lc, 11)
    self.assertEqual(lang, 2)
    trained, losses = master_asr.fit(master_asr.stage2_loss(lc2, lang), tree, labels,
                                     master_asr.stage2_optimizer(master_asr.ScheduleConfig(lr=1e-2, steps=4)),
                                     lambda i: dict(tiny_batch(np.random.default_rng(i)), lang=np.int32(0)), 4)
    self.assertLen(losses, 4)
    jax.tree.map(np.testing.assert_array_equal, trained["base"], tree["base"])
    self.assertFalse(np.array_equal(trained["new"]["head"]["kernel"], tree["new"]["head"]["kernel"]))
    merged, head = master_asr.merge(trained)
    for l in (0, 1):
      after = np.asarray(model.logits(merged, probe["feats"], probe["frame_mask"], lc2.enc, lc2.masks, l)[0])
      np.testing.assert_array_equal(after, before[l])
    new_logits = model.logits(merged, probe["feats"], probe["frame_mask"], lc2.enc, lc2.masks, lang, head)[0]
    self.assertEqual(new_logits.shape[-1], 11)

  def test_parameter_accounting(self):
    mc = artisan.MaskConfig(kind="artisan", num_languages=3, num_specialists=4)
    params = model.init_params(jax.random.PRNGKey(0), ENC, mc)
    lc = master_asr.LossConfig(ENC, mc, None)
    tree, labels, _, _ = master_asr.new_language(jax.random.PRNGKey(1), "master_asr", params, lc, 12)
    trainable, _ = train_lib.partition(tree, labels)
    n_artisan = ENC.num_layers * len(mc.targets)
    head = 12 * (ENC.d_model + 1)
    self.assertEqual(train_lib.count_params(trainable), n_artisan * mc.num_specialists + head)
    acc = master_asr.accounting("master_asr", params, lc, tree["new"])
    self.assertEqual(acc["per_language_stored"], n_artisan * mc.num_specialists)
    self.assertLess(acc["per_language_stored"], 0.01 * acc["encoder"])
    enc_a = dataclasses.replace(ENC, adapter_dim=16, adapter_languages=3)
    pa = model.init_params(jax.random.PRNGKey(0), enc_a)
    adapters = master_asr.accounting("adapters", pa, master_asr.LossConfig(enc_a))["per_language_stored"]
    self.assertEqual(adapters, ENC.num_layers * (2 * 32 * 16 + 16 + 32))
    self.assertGreaterEqual(adapters, 10 * acc["per_language_stored"])


class FoldTest(absltest.TestCase):

  def test_folded_equals_masked_forward(self):
    mc = artisan.MaskConfig(kind="artisan", num_languages=3, num_specialists=2)
    params = model.init_params(jax.random.PRNGKey(0), ENC, mc)
    b = tiny_batch(np.random.default_rng(0))
    for lang in range(3):
      ref = model.logits(params, b["feats"], b["frame_mask"], ENC, mc, lang)[0]
      dense, enc = inference.fold(params, ENC, mc, lang)
      self.assertNotIn("masks", dense)
      out = model.logits(dense, b["feats"], b["frame_mask"], enc)[0]
      np.testing.assert_allclose(out, ref, atol=1e-5)
      zeros = [float((dense["layers"][t]["kernel"] == 0).mean()) for t in artisan.ATTENTION]
      np.testing.assert_allclose(zeros, 0.3, atol=0.01)


class FrontendTest(absltest.TestCase):

  def test_log_mel_matches_librosa(self):
    import librosa  # pylint: disable=g-import-not-at-top
    cfg = frontend.FrontendConfig(n_mels=40)
    np.testing.assert_allclose(frontend.mel_filterbank(cfg), librosa.filters.mel(sr=16000, n_fft=400, n_mels=40),
                               atol=1e-6)
    t = np.arange(12345) / 16000
    rng = np.random.default_rng(0)
    y = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) * (1 + np.sin(2 * np.pi * 3 * t)) +
         0.05 * rng.standard_normal(t.size)).astype(np.float32)
    ref = np.log(librosa.feature.melspectrogram(y=y, sr=16000, n_fft=400, hop_length=160, n_mels=40,
                                                center=True, pad_mode="constant") + 1e-6).T
    out = np.asarray(frontend.log_mel(jnp.asarray(y[None]), cfg))[0]
    self.assertEqual(out.shape, ref.shape)
    self.assertLess(np.abs(out - ref).max(), 1e-3)

  def test_spec_augment_masks_bands(self):
    feats = jnp.ones((2, 50, 16))
    out = np.asarray(frontend.spec_augment(jax.random.PRNGKey(0), feats, frontend.SpecAugmentConfig(1, 4, 1, 10)))
    self.assertTrue(set(np.unique(out)) <= {0.0, 1.0})
    self.assertLess(out.mean(), 1.0)
    self.assertGreater(out.mean(), 0.5)


class CTCAndMetricsTest(absltest.TestCase):

  def test_ctc_matches_torch(self):
    import torch  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 20, 6)).astype(np.float32)
    in_len = np.array([20, 15, 12])
    labels = rng.integers(1, 6, (3, 7)).astype(np.int32)
    lab_len = np.array([7, 4, 2])
    fm = (np.arange(20)[None] < in_len[:, None]).astype(np.float32)
    lm = (np.arange(7)[None] < lab_len[:, None]).astype(np.float32)
    ours = np.asarray(ctc.ctc_loss(jnp.asarray(logits), fm, labels * lm.astype(np.int32), lm))
    lp = torch.log_softmax(torch.from_numpy(logits), -1).transpose(0, 1)
    ref = torch.nn.functional.ctc_loss(lp, torch.from_numpy(labels).long(), torch.from_numpy(in_len),
                                       torch.from_numpy(lab_len), blank=0, reduction="none").numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4)

  def test_ctc_finite_on_handmade_alignment(self):
    logits = np.full((1, 5, 3), -5.0, np.float32)
    for t, k in enumerate([1, 0, 1, 2, 2]):  # "a _ a b b" aligns to "a a b"
      logits[0, t, k] = 5.0
    loss = ctc.ctc_loss(jnp.asarray(logits), np.ones((1, 5)), np.array([[1, 1, 2]]), np.ones((1, 3)))
    self.assertTrue(np.isfinite(loss).all())
    self.assertLess(float(loss[0]), 0.1)

  def test_greedy_decode(self):
    seq = [1, 1, 0, 2, 2, 0, 0, 1, 3]
    logits = jax.nn.one_hot(jnp.array([seq, [0] * 9]), 4) * 10
    mask = jnp.array([[1] * 8 + [0], [1] * 9])
    ids, lengths = ctc.greedy_decode(logits, mask)
    self.assertEqual(ctc.unpack(ids, lengths), [[1, 2, 1], []])

  def test_cer_wer_match_jiwer(self):
    import jiwer  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    letters = list("abcde ")
    refs = ["".join(rng.choice(letters[:-1], 1)) + "".join(rng.choice(letters, rng.integers(3, 15)))
            for _ in range(20)]
    hyps = ["".join(rng.choice(letters, rng.integers(0, 15))) for _ in range(20)]
    refs = [" ".join(r.split()) for r in refs]
    hyps = [" ".join(h.split()) for h in hyps]
    self.assertAlmostEqual(ctc.cer(refs, hyps), jiwer.cer(refs, hyps), places=12)
    nonempty = [(r, h) for r, h in zip(refs, hyps) if h]
    r2, h2 = zip(*nonempty)
    self.assertAlmostEqual(ctc.wer(list(r2), list(h2)), jiwer.wer(list(r2), list(h2)), places=12)


class VocabAndInputsTest(absltest.TestCase):

  def test_vocabulary_grows_without_moving_ids(self):
    v = vocab_lib.Vocabulary.from_texts(["hallo welt"])
    ids = v.encode("hallo")
    v2 = v.extend(["привет"])
    self.assertEqual(v2.encode("hallo"), ids)
    self.assertEqual(v2.size, v.size + len(set("привет")))
    self.assertEqual(v2.decode(v2.encode("привет welt")), "привет welt")
    with self.assertRaisesRegex(ValueError, r"'п'.*not in the vocabulary"):
      v.encode("привет")

  def test_normalize(self):
    self.assertEqual(vocab_lib.normalize_text("L'été — Deux, fois!"), "l été deux fois")
    with self.assertRaisesRegex(ValueError, "digits"):
      vocab_lib.normalize_text("2 fois")

  def test_audio_conversions_and_refusals(self):
    import soundfile  # pylint: disable=g-import-not-at-top
    d = tempfile.mkdtemp()
    t = np.arange(8000) / 8000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([tone, 0.5 * tone], 1).astype(np.float32)
    path = os.path.join(d, "stereo8k.flac")
    soundfile.write(path, stereo, 8000)
    out = audio_lib.load(path)
    self.assertEqual(out.shape, (16000,))  # resampled 8 kHz -> 16 kHz
    self.assertAlmostEqual(float(np.abs(out).max()), 0.375, delta=0.01)  # mean of the two channels
    empty = os.path.join(d, "empty.wav")
    open(empty, "wb").close()
    with self.assertRaisesRegex(ValueError, "empty"):
      audio_lib.load(empty)
    corrupt = os.path.join(d, "corrupt.wav")
    with open(corrupt, "wb") as f:
      f.write(b"RIFF\x00\x00\x00\x00WAVEjunk" + os.urandom(100))
    with self.assertRaisesRegex(ValueError, "corrupt"):
      audio_lib.load(corrupt)
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(0, np.float32), 16000, format="WAV")
    with self.assertRaisesRegex(ValueError, "empty"):
      audio_lib.load(buf.getvalue())
    with self.assertRaisesRegex(ValueError, "non-finite"):
      audio_lib.prepare(np.array([0.0, np.nan]), 16000)

  def test_featurize_refuses_bad_rows(self):
    d = tempfile.mkdtemp()
    path = os.path.join(d, "a.wav")
    audio_lib.write_wav(path, 0.1 * np.sin(np.arange(8000) / 5.0))  # 0.5 s
    v = vocab_lib.Vocabulary.from_texts(["ab"])
    enc = dataclasses.replace(ENC, n_mels=40)
    ok = data_lib.featurize([{"path": path, "text": "ab", "language": "de"}], v, ("de",), enc, 80, 8)
    self.assertEqual(ok.labels[0, :2].tolist(), [2, 3])
    with self.assertRaisesRegex(ValueError, "no selection row"):
      data_lib.featurize([{"path": path, "text": "ab", "language": "xx"}], v, ("de",), enc, 80, 8)
    with self.assertRaisesRegex(ValueError, "not in the vocabulary"):
      data_lib.featurize([{"path": path, "text": "abz", "language": "de"}], v, ("de",), enc, 80, 8)
    with self.assertRaisesRegex(ValueError, "CTC frames"):
      data_lib.featurize([{"path": path, "text": "ab" * 8, "language": "de"}], v, ("de",), enc, 80, 16)
    with self.assertRaisesRegex(ValueError, "longer than max_frames"):
      data_lib.featurize([{"path": path, "text": "ab", "language": "de"}], v, ("de",), enc, 20, 8)
    rows = [{"path": path, "text": "ab" * 8, "language": "de"}, {"path": path, "text": "ba", "language": "de"}]
    kept = data_lib.featurize(rows, v, ("de",), enc, 80, 16, skip_unfit=True)
    self.assertEqual((kept.texts, kept.skipped), (["ba"], (path,)))
    with self.assertRaisesRegex(ValueError, "not in the vocabulary"):  # skip_unfit never hides bad text
      data_lib.featurize([{"path": path, "text": "abz", "language": "de"}], v, ("de",), enc, 80, 8, skip_unfit=True)


if __name__ == "__main__":
  absltest.main()
