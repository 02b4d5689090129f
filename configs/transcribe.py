"""Transcribe a sound file with a trained Master-ASR recognizer (one folded, dense model per language).

  python -m experiments.run --config=configs/transcribe.py \
      --config.recognizer=results/master_asr/<run>/recognizer.npz --config.audio=speech.wav --config.language=de

Any rate and channel count: the audio is resampled to 16 kHz and down-mixed to mono (lacax.asr.audio).
Variant "cpu" is the same (transcription is cheap).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "cpu"):
    raise ValueError(f"configs/transcribe.py variant {arg!r} is unknown; expected '' or 'cpu'")
  c = ml_collections.ConfigDict()
  c.experiment = "transcribe"
  c.results_dir = "results"
  c.resume = ""  # a run directory, or "latest", to finish an interrupted run (lacax.runs)
  c.recognizer = ""  # recognizer.npz written by the master_asr job
  c.audio = ""  # a WAV / FLAC file (or a comma-separated list)
  c.language = ""  # a language the recognizer has a model for
  return c
