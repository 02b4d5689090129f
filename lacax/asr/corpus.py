"""An offline multilingual speech corpus: eSpeak NG speaking text that ships in PyPI packages.

Text: frequent words from `wordfreq` (top-N lists for 40+ languages) joined into short phrases, and number
words from `num2words`, normalised by `vocab.normalize_text`. Every phrase is unique within its language, and
phrases are split into train / dev / test **by text** (no phrase is in two splits). Each utterance is spoken by
one voice drawn per utterance (an eSpeak variant, a rate, a pitch), resampled from eSpeak's 22,050 Hz to
16 kHz mono and written as 16-bit WAV.

Determinism and caching: texts and voices come from `numpy.random.default_rng([seed, crc32(language)])`; an
utterance's file name is a hash of (text, voice, format version), and eSpeak runs order-independently
(`espeak.EspeakServer`), so rebuilding gives the same bytes and a second build synthesises nothing.

Manifests are JSONL, one utterance per line: {"path", "text", "language", "duration", "voice"}; a relative
path is relative to the manifest's directory. Real recordings in the same format (WAV / FLAC / anything
libsndfile reads, any rate, any channel count; see `audio.load`) load the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib

import numpy as np

from lacax.asr import audio as audio_lib
from lacax.asr import espeak
from lacax.asr import vocab as vocab_lib

FORMAT_VERSION = 1
SPLITS = ("train", "dev", "test")
DEFAULT_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """What to synthesise.

  Attributes:
    languages: eSpeak / wordfreq / num2words language codes.
    num_train, num_dev, num_test: utterances per language and split (before the max_seconds filter).
    overrides: per-language (num_train, num_dev, num_test), e.g. low-resource languages.
    seed: the text and voice seed.
    variants: eSpeak voice variants drawn per utterance.
    rate_range, pitch_range: inclusive ranges drawn per utterance.
    min_words, max_words: words per phrase.
    top_words: the wordfreq list size drawn from.
    number_fraction: fraction of phrases that are a spelled-out number (num2words, 0..9999).
    max_seconds: utterances longer than this are left out of the manifest.
  """
  languages: tuple[str, ...] = ("de", "es", "fr", "it", "pt", "nl", "pl", "en")
  num_train: int = 400
  num_dev: int = 40
  num_test: int = 60
  overrides: tuple[tuple[str, tuple[int, int, int]], ...] = ()
  seed: int = 0
  variants: tuple[str, ...] = DEFAULT_VARIANTS
  rate_range: tuple[int, int] = (140, 200)
  pitch_range: tuple[int, int] = (30, 70)
  min_words: int = 2
  max_words: int = 3
  top_words: int = 3000
  number_fraction: float = 0.2
  max_seconds: float = 2.5

  def __post_init__(self):
    if not self.languages:
      raise ValueError("CorpusConfig.languages is empty")
    if len(set(self.languages)) != len(self.languages):
      raise ValueError(f"CorpusConfig.languages has duplicates: {self.languages}")
    if not 1 <= self.min_words <= self.max_words:
      raise ValueError(f"CorpusConfig: expected 1 <= min_words={self.min_words} <= max_words={self.max_words}")
    if not 0 <= self.number_fraction <= 1:
      raise ValueError(f"CorpusConfig.number_fraction={self.number_fraction}: expected 0..1")
    unknown = [k for k, _ in self.overrides if k not in self.languages]
    if unknown:
      raise ValueError(f"CorpusConfig.overrides names languages {unknown} that are not in languages")

  def counts(self, language: str) -> tuple[int, int, int]:
    return dict(self.overrides).get(language, (self.num_train, self.num_dev, self.num_test))


def _rng(seed: int, language: str, salt: int) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(language.encode()), salt])


def word_list(language: str, top: int) -> list[str]:
  """Frequent single words of a language (wordfreq), normalised, at least 2 letters, in frequency order."""
  import wordfreq  # pylint: disable=g-import-not-at-top

  words = wordfreq.top_n_list(language, top)
  if not words:
    raise ValueError(f"wordfreq has no word list for language {language!r}")
  out, seen = [], set()
  for w in words:
    try:
      n = vocab_lib.normalize_text(w)
    except ValueError:
      continue
    if len(n) >= 2 and " " not in n and n not in seen:
      seen.add(n)
      out.append(n)
  return out


def number_words(language: str, n: int) -> str:
  import num2words  # pylint: disable=g-import-not-at-top

  try:
    return vocab_lib.normalize_text(num2words.num2words(n, lang=language))
  except NotImplementedError as e:
    raise ValueError(f"num2words has no language {language!r}; set number_fraction=0") from e


def phrases(language: str, count: int, cfg: CorpusConfig) -> list[str]:
  """`count` unique phrases of one language, deterministic in (cfg.seed, language)."""
  words = word_list(language, cfg.top_words)
  rng = _rng(cfg.seed, language, 0)
  out, seen = [], set()
  for _ in range(100 * count + 100):
    if len(out) == count:
      break
    if rng.random() < cfg.number_fraction:
      text = number_words(language, int(rng.integers(0, 10_000)))
    else:
      k = int(rng.integers(cfg.min_words, cfg.max_words + 1))
      text = " ".join(words[int(i)] for i in rng.integers(0, len(words), size=k))
    if text and text not in seen:
      seen.add(text)
      out.append(text)
  if len(out) < count:
    raise ValueError(f"{language}: only {len(out)} unique phrases for count={count}; raise top_words")
  return out


def utterance_id(text: str, voice: espeak.Voice) -> str:
  key = json.dumps([FORMAT_VERSION, text, dataclasses.asdict(voice)], ensure_ascii=False, sort_keys=True)
  return hashlib.sha1(key.encode()).hexdigest()[:20]


def plan(cfg: CorpusConfig) -> dict[str, list[dict]]:
  """Every utterance to synthesise, by split: {"train": [{text, language, voice}, ...], ...}."""
  out = {s: [] for s in SPLITS}
  for lang in cfg.languages:
    n_train, n_dev, n_test = cfg.counts(lang)
    texts = phrases(lang, n_train + n_dev + n_test, cfg)
    rng = _rng(cfg.seed, lang, 1)
    split_of = ["test"] * n_test + ["dev"] * n_dev + ["train"] * n_train
    for text, split in zip(texts, split_of):
      voice = espeak.Voice(lang, cfg.variants[int(rng.integers(len(cfg.variants)))],
                           int(rng.integers(cfg.rate_range[0], cfg.rate_range[1] + 1)),
                           int(rng.integers(cfg.pitch_range[0], cfg.pitch_range[1] + 1)))
      out[split].append({"text": text, "language": lang, "voice": voice})
  return out


def build(cfg: CorpusConfig, cache_dir: str, progress: bool = False) -> dict:
  """Synthesises what is missing under `cache_dir` and writes `{train,dev,test}.jsonl` there.

  Returns:
    {"manifests": {split: path}, "synthesized": n, "cached": n, "dropped_too_long": n,
     "audio_seconds": s, "synthesis_seconds": s, "x_real_time": audio / synthesis time}.
  """
  os.makedirs(cache_dir, exist_ok=True)
  todo = plan(cfg)
  stats = {"synthesized": 0, "cached": 0, "dropped_too_long": 0, "audio_seconds": 0.0, "synthesis_seconds": 0.0}
  server = None
  manifests = {}
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=sum(len(v) for v in todo.values()), desc="corpus", unit="utt")
  try:
    for split in SPLITS:
      rows = []
      for item in todo[split]:
        voice = item["voice"]
        rel = os.path.join("audio", item["language"], utterance_id(item["text"], voice) + ".wav")
        path = os.path.join(cache_dir, rel)
        if os.path.exists(path) and os.path.getsize(path) > 44:
          import soundfile  # pylint: disable=g-import-not-at-top
          duration = soundfile.info(path).frames / audio_lib.SAMPLE_RATE
          stats["cached"] += 1
        else:
          if server is None:
            server = espeak.EspeakServer()
          start = time.perf_counter()
          samples, rate = server.synthesize(item["text"], voice)
          wav = audio_lib.resample(samples.astype(np.float32) / 32768.0, rate, audio_lib.SAMPLE_RATE)
          os.makedirs(os.path.dirname(path), exist_ok=True)
          audio_lib.write_wav(path, wav)
          stats["synthesis_seconds"] += time.perf_counter() - start
          duration = wav.shape[0] / audio_lib.SAMPLE_RATE
          stats["audio_seconds"] += duration
          stats["synthesized"] += 1
        if bar is not None:
          bar.update(1)
        if duration > cfg.max_seconds:
          stats["dropped_too_long"] += 1
          continue
        rows.append({"path": rel, "text": item["text"], "language": item["language"],
                     "duration": round(duration, 6), "voice": f"{voice.name} s{voice.rate} p{voice.pitch}"})
      manifests[split] = os.path.join(cache_dir, f"{split}.jsonl")
      write_manifest(manifests[split], rows)
  finally:
    if server is not None:
      server.close()
    if bar is not None:
      bar.close()
  stats["x_real_time"] = (stats["audio_seconds"] / stats["synthesis_seconds"] if stats["synthesis_seconds"]
                          else None)
  return {"manifests": manifests, **stats}


def write_manifest(path: str, rows: list[dict]) -> None:
  """JSONL, atomically (temp file + rename)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
  os.replace(tmp, path)


REQUIRED = ("path", "text", "language")


def read_manifest(path: str) -> list[dict]:
  """Rows of a JSONL manifest with absolute paths; validates every row (errors name file and line)."""
  rows = []
  base = os.path.dirname(os.path.abspath(path))
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON: {e}") from e
      missing = [k for k in REQUIRED if k not in row]
      if missing:
        raise ValueError(f"{path}:{n}: missing fields {missing} (need {REQUIRED})")
      row = dict(row, path=row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"]),
                 text=vocab_lib.normalize_text(row["text"], f"{path}:{n} text"))
      rows.append(row)
  return rows
