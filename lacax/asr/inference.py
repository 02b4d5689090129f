"""Deployment: masks folded into dense weights once per language, and `transcribe(audio, language)`.

`fold(params, cfg, lang)` computes every mask of language `lang` once and returns plain dense params (no
"masks", one adapter set), so a deployed language runs the dense forward at dense speed (bench_asr.py measures
the real-time factor). `Recognizer` bundles the folded models of every language with their vocabularies.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lacax.asr import artisan
from lacax.asr import audio as audio_lib
from lacax.asr import ctc
from lacax.asr import data as data_lib
from lacax.asr import frontend
from lacax.asr import model
from lacax.asr import vocab as vocab_lib


def fold(params: dict, enc: model.EncoderConfig, masks: artisan.MaskConfig, lang: int,
         head: dict | None = None) -> tuple[dict, model.EncoderConfig]:
  """Dense params of one language (masks applied once, its adapters only, its head). Returns (params, cfg)."""
  dense = {k: v for k, v in params.items() if k not in ("masks", "adapters")}
  dense["layers"] = jax.jit(artisan.apply_masks, static_argnums=3)(params["layers"], params.get("masks", {}),
                                                                     jnp.int32(lang), masks)
  if head is not None:
    dense["head"] = head
  if "adapters" in params:
    dense["adapters"] = jax.tree.map(lambda a: a[lang:lang + 1], params["adapters"])
    enc = dataclasses.replace(enc, adapter_languages=1)
  return jax.tree.map(jnp.asarray, dense), enc


@functools.partial(jax.jit, static_argnames=("enc",))
def _decode(params, feats, frame_mask, enc):
  logits, mask = model.logits(params, feats, frame_mask, enc, artisan.MaskConfig(), 0)
  return ctc.greedy_decode(logits, mask)


def decode_dataset(params: dict, enc: model.EncoderConfig, ds: data_lib.Dataset, vocab: vocab_lib.Vocabulary,
                   batch_size: int = 32) -> list[str]:
  """Greedy transcripts of a featurised data set with folded (dense) params."""
  out = []
  for start in range(0, len(ds), batch_size):
    idx = np.arange(start, min(start + batch_size, len(ds)))
    pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    ids, lengths = _decode(params, jnp.asarray(ds.feats[pad]), jnp.asarray(ds.frame_mask[pad]), enc)
    out.extend(vocab.decode(x) for x in ctc.unpack(ids, lengths)[:len(idx)])
  return out


def cer_of(params, enc, ds, vocab, batch_size: int = 32) -> float:
  return ctc.cer(ds.texts, decode_dataset(params, enc, ds, vocab, batch_size))


@dataclasses.dataclass
class Recognizer:
  """Folded per-language models: `transcribe(audio, language) -> text`.

  Attributes:
    models: language code -> (dense params, EncoderConfig).
    vocabs: language code -> Vocabulary of its head.
    frontend: the feature settings the models were trained with.
  """
  models: dict
  vocabs: dict
  frontend: frontend.FrontendConfig = frontend.FrontendConfig()

  def transcribe(self, audio, language: str, sample_rate: int | None = None) -> str:
    """audio: a path, WAV/FLAC bytes, or samples ([n] or [n, channels]) with `sample_rate`.

    Other rates are resampled to 16 kHz and stereo is down-mixed (`audio.prepare`); an unknown language is a
    ValueError naming the deployed ones.
    """
    if language not in self.models:
      raise ValueError(f"language {language!r} has no deployed model (selection row); deployed: "
                       f"{sorted(self.models)}")
    if isinstance(audio, (str, bytes)) or hasattr(audio, "__fspath__"):
      wav = audio_lib.load(audio, self.frontend.sample_rate)
    else:
      if sample_rate is None:
        raise ValueError("transcribe: pass sample_rate= with raw samples")
      wav = audio_lib.prepare(np.asarray(audio), sample_rate, "samples", self.frontend.sample_rate)
    params, enc = self.models[language]
    frames = self.frontend.num_frames(len(wav))
    padded = 1 + (-(-frames // 64)) * 64  # pad to a multiple of 64 frames: few compiles across lengths
    feats, mask = data_lib.features([wav], padded, self.frontend)
    ids, lengths = _decode(params, jnp.asarray(feats), jnp.asarray(mask), enc)
    return self.vocabs[language].decode(ctc.unpack(ids, lengths)[0])

  def save(self, path: str) -> None:
    """One .npz (flattened params per language) + JSON metadata, written atomically."""
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    from lacax.train import path_str  # pylint: disable=g-import-not-at-top

    arrays, meta = {}, {"languages": {}, "frontend": dataclasses.asdict(self.frontend)}
    for code, (params, enc) in self.models.items():
      for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        arrays[f"{code}::{path_str(p)}"] = np.asarray(x)
      meta["languages"][code] = {"enc": dataclasses.asdict(enc), "chars": list(self.vocabs[code].chars)}
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Recognizer":
    import json  # pylint: disable=g-import-not-at-top

    with np.load(path) as z:
      meta = json.loads(bytes(z["__meta__"]).decode())
      flat = {k: z[k] for k in z.files if k != "__meta__"}
    models, vocabs = {}, {}
    for code, m in meta["languages"].items():
      tree: dict = {}
      for key, x in flat.items():
        c, p = key.split("::", 1)
        if c != code:
          continue
        node = tree
        parts = p.split("/")
        for part in parts[:-1]:
          node = node.setdefault(part, {})
        node[parts[-1]] = jnp.asarray(x)
      enc = m["enc"]
      enc = model.EncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in enc.items()})
      models[code] = (tree, enc)
      vocabs[code] = vocab_lib.Vocabulary(tuple(m["chars"]))
    return cls(models, vocabs, frontend.FrontendConfig(**meta["frontend"]))
