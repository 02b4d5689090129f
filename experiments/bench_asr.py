"""Master-ASR speed: training step time vs dense, real-time factor of the folded model, corpus synthesis speed.

  python -m experiments.bench_asr [--d_model=128] [--layers=4] [--batch=16] [--steps=20]

Timings interleave the compared functions and keep each one's minimum over `--steps` calls, so that the
load of a shared machine (which only adds time) distorts the ratios as little as possible.
* Training step: the jitted lacax.train step of stage-1 Master-ASR (K specialists, top-(1 - t) masks of the
  q/k/v/o projections recomputed every step, STE) vs the dense model of the same size (target: <= 1.3x).
* Inference real-time factor (compute seconds / audio seconds, greedy CTC decoding of a batch of 2 s
  utterances): the folded Master-ASR model (masks computed once per language, dense weights) vs the dense
  model (target: equal within 5%), plus the unfolded masked forward for reference.
* Corpus synthesis speed (x real time): a fresh 2-language corpus through eSpeak NG, resampling, WAV writes.
Targets are reported, never asserted. Writes `results/bench_asr/<timestamp>.json` and prints a table.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lacax import results as results_lib
from lacax import train as train_lib
from lacax.asr import artisan
from lacax.asr import corpus
from lacax.asr import inference
from lacax.asr import master_asr as ma
from lacax.asr import model

_D = flags.DEFINE_integer("d_model", 128, "Model width.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Transformer layers.")
_BATCH = flags.DEFINE_integer("batch", 16, "Utterances per batch.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps / forwards per measurement.")
_K = flags.DEFINE_integer("specialists", 4, "Master-ASR K.")
_LANGS = flags.DEFINE_integer("languages", 8, "Languages (selection rows).")
_UTTS = flags.DEFINE_integer("corpus_utterances", 30, "Utterances per language for the synthesis timing.")
_OUT = flags.DEFINE_string("out", "results/bench_asr", "Output folder.")


def _time(fns: dict, steps: int) -> dict:
  """Seconds per call of each function: calls interleaved round-robin, the minimum kept (robust to the load
  of a shared machine, which only ever adds time)."""
  for fn in fns.values():  # compile + warm-up
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(steps):
    for k, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - start)
  return {k: float(np.min(v)) for k, v in times.items()}


def main(argv):
  del argv
  frames, n_mels = 201, 40  # 2 s of 16 kHz audio at a 10 ms hop
  enc = model.EncoderConfig(d_model=_D.value, num_layers=_LAYERS.value, num_heads=4, ffn_dim=4 * _D.value,
                            subsample_dim=_D.value, n_mels=n_mels, vocab_size=40)
  rng = np.random.default_rng(0)
  batch = {"feats": rng.standard_normal((_BATCH.value, frames, n_mels)).astype(np.float32),
           "frame_mask": np.ones((_BATCH.value, frames), np.float32),
           "labels": rng.integers(1, 40, (_BATCH.value, 20)).astype(np.int32),
           "label_mask": np.ones((_BATCH.value, 20), np.float32), "lang": np.int32(3)}
  batch = jax.tree.map(jnp.asarray, batch)
  out = {"cpu": results_lib.cpu_model(), "devices": [str(d) for d in jax.devices()], "config": {
      "d_model": _D.value, "layers": _LAYERS.value, "batch": _BATCH.value, "frames": frames,
      "specialists": _K.value, "languages": _LANGS.value}}
  sched = ma.ScheduleConfig(lr=1e-3, steps=1000, phase_every=0)  # W and M both update: the costlier case
  mcs = {"dense": artisan.MaskConfig(),
         "master_asr": artisan.MaskConfig(kind="artisan", num_specialists=_K.value, num_languages=_LANGS.value)}
  step_fns, params_of = {}, {}
  for method, mc in mcs.items():
    params = model.init_params(jax.random.PRNGKey(0), enc, mc)
    params_of[method] = params
    opt = ma.stage1_optimizer(method, sched)
    labels = ma.labels_for(params, ma.trainable_groups(method))
    state = train_lib.create_train_state(params, opt, labels=labels)
    step = train_lib.make_train_step(ma.stage1_loss(ma.LossConfig(enc, mc, None)), opt, labels=labels,
                                     donate=False)
    step_fns[method] = lambda step=step, state=state: step(state, batch)[1]["loss"]
  step_s = _time(step_fns, _STEPS.value)
  out["train_step_s"] = step_s
  out["train_step_ratio"] = step_s["master_asr"] / step_s["dense"]

  audio_s = _BATCH.value * (frames - 1) * 160 / 16000
  folded, enc_f = inference.fold(params_of["master_asr"], enc, mcs["master_asr"], 3)
  dense_fwd = jax.jit(lambda p, f, m: model.logits(p, f, m, enc)[0])
  masked_fwd = jax.jit(lambda p, f, m: model.logits(p, f, m, enc, mcs["master_asr"], 3)[0])
  secs = _time({"dense": lambda: dense_fwd(params_of["dense"], batch["feats"], batch["frame_mask"]),
                 "master_asr_folded": lambda: dense_fwd(folded, batch["feats"], batch["frame_mask"]),
                 "master_asr_unfolded": lambda: masked_fwd(params_of["master_asr"], batch["feats"],
                                                           batch["frame_mask"])}, _STEPS.value)
  rtf = {k: v / audio_s for k, v in secs.items()}
  out["real_time_factor"] = rtf
  out["folded_vs_dense"] = rtf["master_asr_folded"] / rtf["dense"]

  cfg = corpus.CorpusConfig(languages=("de", "es"), num_train=_UTTS.value, num_dev=0, num_test=0,
                            max_seconds=30.0)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    built = corpus.build(cfg, tmp)
    wall = time.perf_counter() - start
  out["corpus"] = {"utterances": built["synthesized"], "audio_seconds": built["audio_seconds"],
                   "wall_seconds": wall, "x_real_time": built["audio_seconds"] / wall}

  print(f"CPU: {out['cpu']}")
  print(f"{'measure':<40}{'value':>14}{'target':>14}")
  print(f"{'train step dense (s)':<40}{step_s['dense']:14.4f}")
  print(f"{'train step master_asr (s)':<40}{step_s['master_asr']:14.4f}")
  print(f"{'train step ratio master_asr / dense':<40}{out['train_step_ratio']:14.3f}{'<= 1.3':>14}")
  for k, v in rtf.items():
    print(f"{'RTF ' + k:<40}{v:14.5f}")
  print(f"{'RTF ratio folded / dense':<40}{out['folded_vs_dense']:14.3f}{'1 +- 0.05':>14}")
  print(f"{'corpus synthesis (x real time)':<40}{out['corpus']['x_real_time']:14.1f}")
  os.makedirs(_OUT.value, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  path = os.path.join(_OUT.value, f"{stamp}.json")
  results_lib.write_json(path, {**out, **results_lib.provenance()})
  print(f"results: {path}")


if __name__ == "__main__":
  app.run(main)
