"""Audio in: WAV / FLAC / anything libsndfile reads, as float32 mono at the model's sample rate.

Conversions (documented, never silent failures):
  * another sample rate is **resampled** (polyphase, `scipy.signal.resample_poly`) to the target rate;
  * multi-channel audio is **down-mixed** to mono by averaging the channels;
  * int PCM is scaled to [-1, 1].
Refused with a `ValueError` naming the file: empty audio, unreadable / corrupt files, non-finite samples.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

SAMPLE_RATE = 16_000


def resample(samples: np.ndarray, rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Polyphase resampling of a 1-D signal from `rate` to `target_rate` (float32 out)."""
  if rate <= 0 or target_rate <= 0:
    raise ValueError(f"resample: rates must be positive, got rate={rate}, target_rate={target_rate}")
  samples = np.asarray(samples, np.float32)
  if rate == target_rate:
    return samples
  import scipy.signal  # pylint: disable=g-import-not-at-top

  g = math.gcd(int(rate), int(target_rate))
  return scipy.signal.resample_poly(samples, target_rate // g, rate // g).astype(np.float32)


def to_mono_float(samples: np.ndarray, source: str = "audio") -> np.ndarray:
  """[n] or [n, channels] int/float samples -> float32 mono [n] in [-1, 1]."""
  samples = np.asarray(samples)
  if np.issubdtype(samples.dtype, np.integer):
    samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max + 1)
  samples = samples.astype(np.float32)
  if samples.ndim == 2:
    samples = samples.mean(axis=1)
  elif samples.ndim != 1:
    raise ValueError(f"{source}: expected samples shaped [n] or [n, channels], got {samples.shape}")
  return samples


def prepare(samples: np.ndarray, rate: int, source: str = "audio", target_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Validates and converts raw samples: mono float32 at `target_rate`."""
  mono = to_mono_float(samples, source)
  if mono.size == 0:
    raise ValueError(f"{source}: audio is empty (0 samples)")
  if not np.all(np.isfinite(mono)):
    raise ValueError(f"{source}: audio has non-finite samples (NaN or inf)")
  return resample(mono, rate, target_rate)


def load(path_or_bytes: str | bytes | os.PathLike, target_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Reads a sound file (path or bytes) as float32 mono at `target_rate` (see the module docstring)."""
  import soundfile  # pylint: disable=g-import-not-at-top

  source = "<bytes>" if isinstance(path_or_bytes, bytes) else os.fspath(path_or_bytes)
  if isinstance(path_or_bytes, bytes):
    if not path_or_bytes:
      raise ValueError("<bytes>: audio is empty (0 bytes)")
    handle = io.BytesIO(path_or_bytes)
  else:
    if not os.path.exists(source):
      raise FileNotFoundError(f"audio file {source!r} does not exist")
    if os.path.getsize(source) == 0:
      raise ValueError(f"audio file {source!r} is empty (0 bytes)")
    handle = source
  try:
    samples, rate = soundfile.read(handle, dtype="float32", always_2d=False)
  except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
    raise ValueError(f"audio file {source!r} is unreadable or corrupt: {e}") from e
  return prepare(samples, rate, source, target_rate)


def write_wav(path: str, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
  """Writes int16 PCM WAV atomically (temp file + rename); float input is clipped to [-1, 1]."""
  import soundfile  # pylint: disable=g-import-not-at-top

  samples = np.asarray(samples)
  if np.issubdtype(samples.dtype, np.floating):
    samples = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
  tmp = f"{path}.tmp{os.getpid()}.wav"
  soundfile.write(tmp, samples, rate, subtype="PCM_16", format="WAV")
  os.replace(tmp, path)
