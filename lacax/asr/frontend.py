"""Log-mel features (jitted) and SpecAugment.

`log_mel` matches librosa's `melspectrogram(center=True, pad_mode="constant", window="hann", power=2,
htk=False, norm="slaney")` followed by `log(mel + eps)`: framing + periodic Hann + `rfft` + the Slaney
mel filterbank as one matmul (tests: max |difference| < 1e-3 in the log domain on speech-like signals).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FrontendConfig:
  """Attributes: sample rate (Hz), FFT / window / hop sizes (samples), mel bands and range, log floor."""
  sample_rate: int = 16_000
  n_fft: int = 400
  hop_length: int = 160
  n_mels: int = 40
  fmin: float = 0.0
  fmax: float | None = None
  log_eps: float = 1e-6

  def __post_init__(self):
    if self.hop_length <= 0 or self.n_fft <= 0:
      raise ValueError(f"FrontendConfig: n_fft={self.n_fft}, hop_length={self.hop_length} must be positive")
    if self.n_mels <= 0:
      raise ValueError(f"FrontendConfig.n_mels={self.n_mels} must be positive")

  def num_frames(self, num_samples):
    """Frames of a signal of `num_samples` (center padding): 1 + n // hop."""
    return 1 + num_samples // self.hop_length


def _hz_to_mel(f):
  f = np.asarray(f, np.float64)
  f_sp = 200.0 / 3
  mels = f / f_sp
  min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
  min_log_mel = min_log_hz / f_sp
  return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m):
  m = np.asarray(m, np.float64)
  f_sp = 200.0 / 3
  freqs = f_sp * m
  min_log_hz, logstep = 1000.0, np.log(6.4) / 27.0
  min_log_mel = min_log_hz / f_sp
  return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


def mel_filterbank(cfg: FrontendConfig) -> np.ndarray:
  """Slaney-style, Slaney-normalised mel filterbank [n_mels, n_fft // 2 + 1] (librosa's default)."""
  fmax = cfg.fmax if cfg.fmax is not None else cfg.sample_rate / 2
  fft_freqs = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
  mel_f = _mel_to_hz(np.linspace(_hz_to_mel(cfg.fmin), _hz_to_mel(fmax), cfg.n_mels + 2))
  fdiff = np.diff(mel_f)
  ramps = mel_f[:, None] - fft_freqs[None, :]
  lower = -ramps[:-2] / fdiff[:-1, None]
  upper = ramps[2:] / fdiff[1:, None]
  weights = np.maximum(0, np.minimum(lower, upper))
  weights *= (2.0 / (mel_f[2:cfg.n_mels + 2] - mel_f[:cfg.n_mels]))[:, None]
  return weights.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def log_mel(audio: jax.Array, cfg: FrontendConfig = FrontendConfig()) -> jax.Array:
  """audio: [batch, samples] float -> log-mel [batch, 1 + samples // hop, n_mels] (float32)."""
  pad = cfg.n_fft // 2
  x = jnp.pad(audio.astype(jnp.float32), ((0, 0), (pad, pad)))
  n_frames = 1 + audio.shape[1] // cfg.hop_length
  idx = jnp.arange(n_frames)[:, None] * cfg.hop_length + jnp.arange(cfg.n_fft)[None, :]
  window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(cfg.n_fft) / cfg.n_fft)  # periodic Hann
  frames = x[:, idx] * window
  power = jnp.abs(jnp.fft.rfft(frames, axis=-1))**2
  mel = power @ jnp.asarray(mel_filterbank(cfg)).T
  return jnp.log(mel + cfg.log_eps)


def normalize(feats: jax.Array, frame_mask: jax.Array) -> jax.Array:
  """Per-utterance mean/variance normalisation over valid frames; padded frames become 0.

  feats: [batch, frames, n_mels]; frame_mask: [batch, frames] (1 = valid).
  """
  m = frame_mask[..., None].astype(feats.dtype)
  n = jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)
  mean = (feats * m).sum(axis=1, keepdims=True) / n
  var = (((feats - mean) * m)**2).sum(axis=1, keepdims=True) / n
  return (feats - mean) * jax.lax.rsqrt(var + 1e-5) * m


@dataclasses.dataclass(frozen=True)
class SpecAugmentConfig:
  """SpecAugment (Park et al. 2019, arXiv 1904.08779) without time warping: masks set features to 0."""
  freq_masks: int = 2
  freq_width: int = 8
  time_masks: int = 2
  time_width: int = 20


def spec_augment(rng: jax.Array, feats: jax.Array, cfg: SpecAugmentConfig) -> jax.Array:
  """feats: [batch, frames, n_mels] (normalised) -> the same with random frequency and time bands zeroed."""
  b, t, f = feats.shape
  keep = jnp.ones((b, t, f), bool)
  keys = jax.random.split(rng, cfg.freq_masks + cfg.time_masks)
  for i in range(cfg.freq_masks):
    kw, ks = jax.random.split(keys[i])
    width = jax.random.randint(kw, (b, 1), 0, cfg.freq_width + 1)
    start = jax.random.randint(ks, (b, 1), 0, max(f - cfg.freq_width, 1))
    band = (jnp.arange(f)[None] >= start) & (jnp.arange(f)[None] < start + width)
    keep &= ~band[:, None, :]
  for i in range(cfg.time_masks):
    kw, ks = jax.random.split(keys[cfg.freq_masks + i])
    width = jax.random.randint(kw, (b, 1), 0, cfg.time_width + 1)
    start = jax.random.randint(ks, (b, 1), 0, max(t - cfg.time_width, 1))
    band = (jnp.arange(t)[None] >= start) & (jnp.arange(t)[None] < start + width)
    keep &= ~band[:, :, None]
  return jnp.where(keep, feats, 0.0)
