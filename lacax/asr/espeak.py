"""eSpeak NG speech synthesis through ctypes, deterministic and in-process.

The library and its voice data come from the PyPI package `espeakng-loader` (preferred: `pip install` is
enough). A system library (Debian `espeak-ng` / `libespeak-ng1`, data in
`/usr/lib/x86_64-linux-gnu/espeak-ng-data`) works too: pass `library=` and `data_path=` or set
`LACAX_ESPEAK_LIBRARY` / `LACAX_ESPEAK_DATA`.

eSpeak NG keeps global state that carries from one utterance to the next (pitch-flutter phase, filter state,
its noise generator; `espeak_Terminate` does not reset it). So that an utterance's samples depend only on its
text and voice, never on what the process spoke before, `EspeakServer` runs the engine in a small worker
process that initialises it once and forks a child per utterance: every utterance starts from the same pristine
engine state (measured: identical bytes in any order; about 10 ms per utterance).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import struct
import subprocess
import sys
import threading

import numpy as np

# espeak_AUDIO_OUTPUT, espeak_PARAMETER, espeak_POSITION_TYPE and flags from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE, _ESPEAK_VOLUME, _ESPEAK_PITCH, _ESPEAK_RANGE, _ESPEAK_WORDGAP = 1, 2, 3, 4, 7
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_EE_OK = 0

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclasses.dataclass(frozen=True)
class Voice:
  """One way of speaking: an eSpeak voice (language) plus a variant, rate and pitch.

  Attributes:
    language: eSpeak voice name, e.g. "de", "es", "pt-br".
    variant: a variant from `espeak-ng-data/voices/!v` ("m3", "f2", "klatt", ...), or "" for the default.
    rate: words per minute (eSpeak accepts 80-450).
    pitch: base pitch 0-99.
  """
  language: str
  variant: str = ""
  rate: int = 175
  pitch: int = 50

  def __post_init__(self):
    if not self.language:
      raise ValueError("Voice.language must be a non-empty eSpeak voice name")
    if not 80 <= self.rate <= 450:
      raise ValueError(f"Voice.rate={self.rate}: expected 80..450 words per minute")
    if not 0 <= self.pitch <= 99:
      raise ValueError(f"Voice.pitch={self.pitch}: expected 0..99")

  @property
  def name(self) -> str:
    return f"{self.language}+{self.variant}" if self.variant else self.language


def _default_paths() -> tuple[str, str]:
  lib = os.environ.get("LACAX_ESPEAK_LIBRARY")
  data = os.environ.get("LACAX_ESPEAK_DATA")
  if lib and data:
    return lib, data
  try:
    import espeakng_loader  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("eSpeak NG not found: `pip install espeakng-loader`, or install Debian espeak-ng and set "
                       "LACAX_ESPEAK_LIBRARY=/usr/lib/x86_64-linux-gnu/libespeak-ng.so.1 and "
                       "LACAX_ESPEAK_DATA=/usr/lib/x86_64-linux-gnu/espeak-ng-data") from e
  return lib or espeakng_loader.get_library_path(), data or espeakng_loader.get_data_path()


class Synthesizer:
  """In-process eSpeak NG: `synthesize(text, voice) -> (samples int16 [n], sample_rate)`."""

  _lock = threading.Lock()  # eSpeak NG is one global engine per process

  def __init__(self, library: str | None = None, data_path: str | None = None):
    default_lib, default_data = (None, None) if (library and data_path) else _default_paths()
    self.library = library or default_lib
    self.data_path = data_path or default_data
    if not os.path.isdir(os.path.join(self.data_path, "voices")) and not os.path.isdir(
        os.path.join(self.data_path, "lang")):
      raise FileNotFoundError(f"eSpeak NG data_path={self.data_path!r} has no voices/ or lang/ directory")
    self._lib = ctypes.CDLL(self.library)
    self._lib.espeak_Initialize.restype = ctypes.c_int
    self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    # eSpeak NG's noise sources (breath, frication) draw from its own generator; seeding it before every
    # utterance makes an utterance independent of what was spoken before it in this process.
    self._lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                       ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    self.sample_rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
    if self.sample_rate <= 0:
      raise RuntimeError(f"espeak_Initialize failed (returned {self.sample_rate}) with data_path={self.data_path!r}")
    self._chunks: list[np.ndarray] = []

    def on_audio(wav, n, _events):
      if n > 0 and wav:
        self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
      return 0  # 0 = continue

    self._callback = _CALLBACK(on_audio)  # keep a reference: ctypes does not
    self._lib.espeak_SetSynthCallback(self._callback)

  def has_voice(self, language: str) -> bool:
    return self._lib.espeak_SetVoiceByName(language.encode()) == _EE_OK

  def synthesize(self, text: str, voice: Voice, seed: int = 0) -> tuple[np.ndarray, int]:
    """Speaks `text`. Returns (int16 samples [n], sample rate, 22,050 Hz for eSpeak NG)."""
    if not text.strip():
      raise ValueError("synthesize: text is empty")
    with self._lock:
      if self._lib.espeak_SetVoiceByName(voice.name.encode()) != _EE_OK:
        raise ValueError(f"eSpeak NG has no voice {voice.name!r} (language {voice.language!r}, "
                         f"variant {voice.variant!r}) in {self.data_path}")
      for param, value in ((_ESPEAK_RATE, voice.rate), (_ESPEAK_PITCH, voice.pitch), (_ESPEAK_VOLUME, 100),
                           (_ESPEAK_RANGE, 50), (_ESPEAK_WORDGAP, 0)):
        self._lib.espeak_SetParameter(param, value, 0)
      self._lib.espeak_ng_SetRandSeed(seed)
      self._chunks = []
      data = text.encode("utf-8") + b"\0"
      err = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
      self._lib.espeak_Synchronize()
      if err != _EE_OK:
        raise RuntimeError(f"espeak_Synth failed with error {err} for text {text[:40]!r}")
      chunks, self._chunks = self._chunks, []
    samples = np.concatenate(chunks) if chunks else np.zeros((0,), np.int16)
    return samples.astype(np.int16), self.sample_rate


def _read_exact(stream, n: int) -> bytes:
  out = b""
  while len(out) < n:
    chunk = stream.read(n - len(out))
    if not chunk:
      raise EOFError("eSpeak worker closed its pipe")
    out += chunk
  return out


def _serve(library: str, data_path: str) -> None:
  """Worker loop: one JSON request per stdin line; replies `status, sample_rate, nbytes` + payload."""
  synth = Synthesizer(library, data_path)
  out = sys.stdout.buffer
  for line in sys.stdin.buffer:
    req = json.loads(line)
    # The parent never loads a voice: pre-loading voices there (to save the child's ~15 ms load) was measured
    # to change later children's output (truncated utterances after some voice sequences).
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child speaks from the parent's pristine engine state and exits
      os.close(r)
      try:
        samples, rate = synth.synthesize(req["text"], Voice(**req["voice"]), req.get("seed", 0))
        payload, status = samples.tobytes(), 0
      except Exception as e:  # pylint: disable=broad-except
        payload, status, rate = str(e).encode(), 1, 0
      with os.fdopen(w, "wb") as f:
        f.write(struct.pack("<iiq", status, rate, len(payload)) + payload)
      os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
      reply = f.read()
    os.waitpid(pid, 0)
    out.write(reply if reply else struct.pack("<iiq", 1, 0, 13) + b"child crashed")
    out.flush()


class EspeakServer:
  """Order-independent, deterministic synthesis through a worker process (see the module docstring).

  Use as a context manager or call `close()`; `synthesize` has the signature of `Synthesizer.synthesize`.
  """

  def __init__(self, library: str | None = None, data_path: str | None = None):
    default_lib, default_data = (None, None) if (library and data_path) else _default_paths()
    self.library, self.data_path = library or default_lib, data_path or default_data
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {root!r}); from lacax.asr import espeak; "
            f"espeak._serve({self.library!r}, {self.data_path!r})")
    self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

  def synthesize(self, text: str, voice: Voice, seed: int = 0) -> tuple[np.ndarray, int]:
    if not text.strip():
      raise ValueError("synthesize: text is empty")
    req = {"text": text, "voice": dataclasses.asdict(voice), "seed": seed}
    self._proc.stdin.write(json.dumps(req).encode() + b"\n")
    self._proc.stdin.flush()
    status, rate, n = struct.unpack("<iiq", _read_exact(self._proc.stdout, 16))
    payload = _read_exact(self._proc.stdout, n) if n else b""
    if status != 0:
      raise ValueError(f"eSpeak NG failed on {text[:40]!r} with voice {voice.name!r}: {payload.decode()}")
    return np.frombuffer(payload, np.int16).copy(), rate

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()
      self._proc.wait(timeout=30)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
