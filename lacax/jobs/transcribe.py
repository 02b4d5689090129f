"""The `transcribe` job: a Master-ASR recognizer (recognizer.npz) transcribes sound files in one language."""

from __future__ import annotations

import time
from typing import Any

import ml_collections

from lacax.asr import inference


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict[str, Any]:
  del run_dir
  for field in ("recognizer", "audio", "language"):
    if not config[field]:
      raise ValueError(f"config.{field} is required (see configs/transcribe.py)")
  rec = inference.Recognizer.load(config.recognizer)
  out = []
  for path in [p.strip() for p in config.audio.split(",") if p.strip()]:
    start = time.perf_counter()
    text = rec.transcribe(path, config.language)
    out.append({"audio": path, "language": config.language, "text": text,
                "seconds": time.perf_counter() - start})
    print(f"{path}\t{text}")
  return {"transcripts": out}
