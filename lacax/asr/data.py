"""Manifest rows -> fixed-shape training arrays (log-mel features, CTC labels, language ids) and batches.

Shapes are static (every utterance padded to `max_frames` features and `max_labels` labels), so a training
step compiles once. Validation happens here, at the boundary, with errors that name the file: audio
(`audio.load`: empty, corrupt, NaN; other rates are resampled, stereo is down-mixed), utterances longer than
`max_frames`, transcripts with characters outside the vocabulary, transcripts too long for CTC at the encoder's
frame rate, and languages without a selection row. None of these can reach the loss as a silent NaN.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from lacax.asr import audio as audio_lib
from lacax.asr import ctc
from lacax.asr import frontend
from lacax.asr import vocab as vocab_lib


@dataclasses.dataclass
class Dataset:
  """Featurised utterances (numpy, host memory).

  Attributes:
    feats: [n, max_frames, n_mels] float32, normalised log-mel (0 on padded frames).
    frame_mask: [n, max_frames] float32.
    labels: [n, max_labels] int32 (0-padded); label_mask: [n, max_labels] float32.
    lang: [n] int32, index into `languages`.
    texts: the normalised transcripts; languages: the language codes of the ids.
  """
  feats: np.ndarray
  frame_mask: np.ndarray
  labels: np.ndarray
  label_mask: np.ndarray
  lang: np.ndarray
  texts: list[str]
  languages: tuple[str, ...]
  skipped: tuple[str, ...] = ()

  def __len__(self):
    return len(self.texts)

  def select(self, idx) -> "Dataset":
    idx = np.asarray(idx)
    return Dataset(self.feats[idx], self.frame_mask[idx], self.labels[idx], self.label_mask[idx],
                   self.lang[idx], [self.texts[i] for i in idx], self.languages)

  def of_language(self, code: str) -> "Dataset":
    return self.select(np.nonzero(self.lang == self.language_id(code))[0])

  def language_id(self, code: str) -> int:
    return language_id(self.languages, code)


def language_id(languages, code: str) -> int:
  if code not in languages:
    raise ValueError(f"language {code!r} has no selection row (known: {list(languages)}); add it first "
                     "(Master-ASR stage 2 adds a row per new language)")
  return list(languages).index(code)


def features(samples: list[np.ndarray], max_frames: int, cfg: frontend.FrontendConfig, chunk: int = 64):
  """Normalised log-mel of 16 kHz float32 signals, padded to max_frames: ([n, F, mels], [n, F])."""
  max_samples = (max_frames - 1) * cfg.hop_length
  n = len(samples)
  feats = np.zeros((n, max_frames, cfg.n_mels), np.float32)
  masks = np.zeros((n, max_frames), np.float32)
  for start in range(0, n, chunk):
    part = samples[start:start + chunk]
    wav = np.zeros((chunk, max_samples), np.float32)
    mask = np.zeros((chunk, max_frames), np.float32)
    for i, s in enumerate(part):
      wav[i, :len(s)] = s
      mask[i, :cfg.num_frames(len(s))] = 1.0
    f = frontend.normalize(frontend.log_mel(jnp.asarray(wav), cfg), jnp.asarray(mask))
    feats[start:start + len(part)] = np.asarray(f)[:len(part)]
    masks[start:start + len(part)] = mask[:len(part)]
  return feats, masks


def featurize(rows: list[dict], vocab: vocab_lib.Vocabulary, languages, enc_cfg, max_frames: int,
              max_labels: int, cfg: frontend.FrontendConfig = frontend.FrontendConfig(),
              skip_unfit: bool = False) -> Dataset:
  """Loads, validates and featurises manifest rows (see the module docstring for what is refused).

  With `skip_unfit`, rows that do not fit the shapes (audio longer than max_frames, transcripts longer than
  max_labels or too long for CTC at the encoder's frame rate) are left out and listed in `Dataset.skipped`
  instead of raising; every other problem still raises.
  """
  samples, labels, lang, texts, skipped = [], [], [], [], []
  max_samples = (max_frames - 1) * cfg.hop_length
  for row in rows:
    src = row["path"]
    lid = language_id(languages, row["language"])
    wav = audio_lib.load(src, cfg.sample_rate)
    ids = vocab.encode(row["text"], f"{src} transcript")
    frames = int(enc_cfg.output_frames(cfg.num_frames(len(wav))))
    problem = None
    if len(wav) > max_samples:
      problem = (f"{src}: {len(wav) / cfg.sample_rate:.2f} s is longer than max_frames={max_frames} "
                 f"({max_samples / cfg.sample_rate:.2f} s); raise max_frames or drop it")
    elif len(ids) > max_labels:
      problem = f"{src}: transcript has {len(ids)} characters > max_labels={max_labels}"
    elif ctc.ctc_min_frames(ids) > frames:
      problem = (f"{src}: transcript {row['text']!r} needs {ctc.ctc_min_frames(ids)} CTC frames but the "
                 f"encoder gives {frames}; the audio is too short for its text")
    if problem is not None:
      if not skip_unfit:
        raise ValueError(problem)
      skipped.append(src)
      continue
    samples.append(wav)
    labels.append(ids)
    lang.append(lid)
    texts.append(row["text"])
  feats, frame_mask = features(samples, max_frames, cfg)
  lab = np.zeros((len(labels), max_labels), np.int32)
  lab_mask = np.zeros((len(labels), max_labels), np.float32)
  for i, ids in enumerate(labels):
    lab[i, :len(ids)] = ids
    lab_mask[i, :len(ids)] = 1.0
  return Dataset(feats, frame_mask, lab, lab_mask, np.asarray(lang, np.int32), texts, tuple(languages),
                 tuple(skipped))


def batch(ds: Dataset, idx) -> dict:
  idx = np.asarray(idx)
  return {"feats": ds.feats[idx], "frame_mask": ds.frame_mask[idx], "labels": ds.labels[idx],
          "label_mask": ds.label_mask[idx], "lang": np.int32(ds.lang[idx[0]])}


def language_batches(ds: Dataset, batch_size: int, seed: int, languages=None):
  """Endless single-language batches: each step draws a language uniformly, then utterances of it.

  Yields dicts {"feats", "frame_mask", "labels", "label_mask", "lang" (scalar int32)}.
  """
  rng = np.random.default_rng(seed)
  codes = list(languages) if languages is not None else sorted(set(ds.languages[i] for i in ds.lang))
  pools = {c: np.nonzero(ds.lang == ds.language_id(c))[0] for c in codes}
  empty = [c for c, p in pools.items() if not len(p)]
  if empty:
    raise ValueError(f"language_batches: no utterances for languages {empty}")
  while True:
    code = codes[int(rng.integers(len(codes)))]
    pool = pools[code]
    yield batch(ds, rng.choice(pool, size=batch_size, replace=len(pool) < batch_size))
