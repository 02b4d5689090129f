"""The Master-ASR job: corpus -> stage 0 (dense) -> stage 1 (every method) -> stage 2 (new languages).

Composes lacax.asr (see configs/master_asr.py for the pipeline). Results: per method and language the test
CER, trainable and stored parameters per language, old-language CER before and after adding each new
language (forgetting) and whether old-language logits stayed bit-identical; the learned language-to-specialist
selections (selections.png); a folded recognizer of every Master-ASR language (recognizer.npz).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lacax.asr import artisan
from lacax.asr import corpus as corpus_lib
from lacax.asr import data as data_lib
from lacax.asr import frontend
from lacax.asr import inference
from lacax.asr import master_asr as ma
from lacax.asr import model
from lacax.asr import vocab as vocab_lib


def _corpus(config) -> tuple[dict, dict]:
  cc = config.corpus
  langs = tuple(cc.languages) + tuple(cc.new_languages)
  cfg = corpus_lib.CorpusConfig(
      languages=langs, num_train=cc.num_train, num_dev=cc.num_dev, num_test=cc.num_test,
      overrides=tuple((l, (cc.new_num_train, cc.num_dev, cc.num_test)) for l in cc.new_languages),
      seed=config.seed, min_words=cc.min_words, max_words=cc.max_words, max_seconds=cc.max_seconds,
      number_fraction=cc.number_fraction)
  cache = cc.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lacax", "asr_corpus")
  start = time.perf_counter()
  built = corpus_lib.build(cfg, cache, progress=True)
  built["build_seconds"] = time.perf_counter() - start
  rows = {s: corpus_lib.read_manifest(p) for s, p in built["manifests"].items()}
  return rows, built


def _cer_table(params, lc: ma.LossConfig, datasets: dict, vocab, lang_ids: dict, head=None) -> dict:
  out = {}
  for code, ds in datasets.items():
    dense, enc = inference.fold(params, lc.enc, lc.masks, lang_ids[code], head)
    out[code] = inference.cer_of(dense, enc, ds, vocab)
  return out


def _probe_logits(params, lc, ds, lang, head=None):
  b = data_lib.batch(ds, np.arange(min(8, len(ds))))
  return np.asarray(model.logits(params, jnp.asarray(b["feats"]), jnp.asarray(b["frame_mask"]), lc.enc,
                                 lc.masks, jnp.int32(lang), head)[0])


def _plot_selections(masks: dict, mc: artisan.MaskConfig, languages, path: str) -> list[list[float]]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  sel = artisan.selections(masks, mc)  # [targets, layers, L, K]
  vec = np.moveaxis(sel, 2, 0).reshape(sel.shape[2], -1).astype(float)  # [L, targets * layers * K]
  inter = vec @ vec.T
  union = vec.sum(1)[:, None] + vec.sum(1)[None] - inter
  jac = inter / np.maximum(union, 1)
  fig, axes = plt.subplots(1, 2, figsize=(14, 0.5 * len(languages) + 2), gridspec_kw={"width_ratios": [3, 1]})
  axes[0].imshow(vec, aspect="auto", cmap="Greys", interpolation="nearest")
  axes[0].set_yticks(range(len(languages)), languages)
  axes[0].set_xlabel(f"(projection, layer, specialist): {len(mc.targets)} x {sel.shape[1]} x {sel.shape[3]}")
  axes[0].set_title("selected specialists per language (black = selected)")
  im = axes[1].imshow(jac, cmap="viridis", vmin=0, vmax=1)
  axes[1].set_xticks(range(len(languages)), languages, rotation=90)
  axes[1].set_yticks(range(len(languages)), languages)
  axes[1].set_title("selection overlap (Jaccard)")
  fig.colorbar(im, ax=axes[1], fraction=0.046)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return jac.round(4).tolist()


class _Stages:
  """Finished training stages saved atomically under `work_dir` (one .npz of params + one .json of figures each);
  the same command with the same `work_dir` skips them and finishes the rest with identical results."""

  def __init__(self, work_dir: str):
    self.dir = work_dir
    os.makedirs(work_dir, exist_ok=True)

  def get(self, name: str, template, train_fn):
    """(params, info): loaded when saved, else `train_fn() -> (params, info)` run and saved."""
    from lacax import results as results_lib  # pylint: disable=g-import-not-at-top
    from lacax.train import path_str  # pylint: disable=g-import-not-at-top
    path = os.path.join(self.dir, name)
    if os.path.exists(path + ".npz") and os.path.exists(path + ".json"):
      with np.load(path + ".npz") as z:
        flat, treedef = jax.tree_util.tree_flatten_with_path(template)
        leaves = [jnp.asarray(z[path_str(p)]) for p, _ in flat]
      with open(path + ".json") as f:
        import json  # pylint: disable=g-import-not-at-top
        info = json.load(f)
      logging.info("stage %s loaded from %s", name, path)
      return jax.tree_util.tree_unflatten(treedef, leaves), info
    params, info = train_fn()
    arrays = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path + ".npz")
    results_lib.write_json(path + ".json", info)
    return params, info


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict[str, Any]:
  t0 = time.perf_counter()
  tc = config.train
  stages = _Stages(config.get("work_dir") or os.path.join(run_dir, "stages"))
  rows, built = _corpus(config)
  old, new = list(config.corpus.languages), list(config.corpus.new_languages)
  vocab = vocab_lib.Vocabulary.from_texts(r["text"] for s in rows.values() for r in s if r["language"] in old)
  new_vocab = {l: vocab.extend(r["text"] for s in rows.values() for r in s if r["language"] == l) for l in new}
  fcfg = frontend.FrontendConfig(n_mels=config.model.n_mels)
  max_frames = fcfg.num_frames(int(config.corpus.max_seconds * fcfg.sample_rate))
  mcfg = config.model
  enc = model.EncoderConfig(d_model=mcfg.d_model, num_layers=mcfg.num_layers, num_heads=mcfg.num_heads,
                            ffn_dim=mcfg.ffn_dim, n_mels=mcfg.n_mels, subsample_dim=mcfg.d_model,
                            pos_conv_kernel=mcfg.pos_conv_kernel, pos_conv_groups=mcfg.pos_conv_groups,
                            vocab_size=vocab.size)

  def feats(split, langs, voc, ids):
    ds = data_lib.featurize([r for r in rows[split] if r["language"] in langs], voc, ids, enc, max_frames,
                            config.max_labels, fcfg, skip_unfit=True)
    skipped[f"{split}/{'+'.join(langs) if len(langs) < 3 else 'old'}"] = len(ds.skipped)
    return ds

  skipped = {}

  train_old = feats("train", old, vocab, tuple(old))
  test_old = {l: feats("test", [l], vocab, tuple(old)) for l in old}
  lang_ids = {l: i for i, l in enumerate(old)}
  logging.info("corpus: %s; featurised %d training utterances in %.0f s", built, len(train_old),
               time.perf_counter() - t0)
  spec = frontend.SpecAugmentConfig() if tc.spec_augment else None
  rng = jax.random.PRNGKey(config.seed)

  def sched(steps, lr):
    return ma.ScheduleConfig(lr=lr, steps=steps, select_lr_mult=tc.select_lr_mult, select_every=tc.select_every,
                             phase_every=tc.phase_every)

  def batches(ds, seed, langs=None):
    gen = data_lib.language_batches(ds, tc.batch_size, seed, langs)
    return lambda _: next(gen)

  timings = {}
  # Stage 0: the dense multilingual "pretrained" encoder.
  lc_dense = ma.LossConfig(enc, artisan.MaskConfig(), spec)
  params0 = model.init_params(rng, enc)

  def stage0():
    start = time.perf_counter()
    p, losses = ma.fit(ma.stage1_loss(lc_dense), params0, ma.labels_for(params0, ("weights", "head")),
                       ma.stage1_optimizer("dense", sched(tc.stage0_steps, tc.lr)), batches(train_old, 0),
                       tc.stage0_steps, seed=config.seed, progress=True)
    return p, {"s_per_step": (time.perf_counter() - start) / tc.stage0_steps,
               "final_loss": float(losses[-10:].mean())}

  params0, info0 = stages.get("stage0", params0, stage0)
  timings["stage0_s_per_step"] = info0["s_per_step"]
  cer_stage0 = _cer_table(params0, lc_dense, test_old, vocab, lang_ids)
  logging.info("stage 0 CER %s", cer_stage0)

  mc_cfg = config.masks
  L = len(old)
  method_cfgs = {
      "dense": (enc, artisan.MaskConfig()),
      "master_asr": (enc, artisan.MaskConfig(kind="artisan", num_specialists=mc_cfg.num_specialists,
                                             num_languages=L, sparsity=mc_cfg.sparsity,
                                             init_noise=mc_cfg.init_noise)),
      "adapters": (dataclasses.replace(enc, adapter_dim=config.adapter_dim, adapter_languages=L),
                   artisan.MaskConfig()),
      "s3router": (enc, artisan.MaskConfig(kind="s3router", targets=tuple(mc_cfg.s3router_targets), num_languages=L,
                                           sparsity=mc_cfg.s3router_sparsity, init_noise=0.0)),
  }
  stage1, results = {}, {"stage1": {}, "stage2": {}, "accounting": {}}
  for i, method in enumerate(config.methods):
    enc_m, mc = method_cfgs[method]
    lc = ma.LossConfig(enc_m, mc, spec)
    fresh = model.init_params(jax.random.fold_in(rng, 100 + i), enc_m, mc)
    params = dict(fresh, **{k: v for k, v in params0.items()})  # stage-0 weights + fresh masks / adapters
    if mc.kind != "none":
      params["masks"] = artisan.init_mask_params(jax.random.fold_in(rng, 200 + i), params0["layers"], mc)
    labels = ma.labels_for(params, ma.trainable_groups(method))

    def stage1_fn(params=params, labels=labels, lc=lc, method=method, i=i):
      start = time.perf_counter()
      p, losses = ma.fit(ma.stage1_loss(lc), params, labels, ma.stage1_optimizer(method, sched(
          tc.stage1_steps, tc.lr)), batches(train_old, 1 + i), tc.stage1_steps, seed=config.seed + i,
                         progress=True)
      return p, {"s_per_step": (time.perf_counter() - start) / tc.stage1_steps,
                 "final_loss": float(losses[-10:].mean())}

    params, info = stages.get(f"stage1_{method}", params, stage1_fn)
    timings[f"stage1_{method}_s_per_step"] = info["s_per_step"]
    stage1[method] = (params, lc)
    cers = _cer_table(params, lc, test_old, vocab, lang_ids)
    results["stage1"][method] = {"cer": cers, "avg_cer": float(np.mean(list(cers.values()))),
                                 "final_loss": info["final_loss"]}
    results["accounting"][method] = ma.accounting(method, params, lc)
    logging.info("stage 1 %s: %s", method, results["stage1"][method])

  # Stage 2: each new language added to each method's stage-1 model, independently.
  recognizer, stage2_trainable = {}, {}
  if "master_asr" in stage1:
    p, lc = stage1["master_asr"]
    for code in old:
      recognizer[code] = (inference.fold(p, lc.enc, lc.masks, lang_ids[code]), vocab)
  for code in new:
    voc = new_vocab[code]
    tr = feats("train", [code], voc, (code,))
    te = feats("test", [code], voc, (code,))
    results["stage2"][code] = {}
    for j, method in enumerate(config.stage2_methods):
      base_method = {"master_asr_head_only": "master_asr", "full_ft": "dense"}.get(method, method)
      if base_method not in stage1:
        continue
      params, lc = stage1[base_method]
      tree, labels, lc2, lang = ma.new_language(jax.random.fold_in(rng, 300 + j), method, params, lc, voc.size)
      probe_before = _probe_logits(params, lc, test_old[old[0]], 0)
      new_trainable = ma.partition(tree, labels)[0]
      start = time.perf_counter()
      trained, losses = ma.fit(ma.stage2_loss(lc2, lang), tree, labels, ma.stage2_optimizer(
          sched(tc.stage2_steps, tc.stage2_lr)), batches(tr, 7 + j), tc.stage2_steps, seed=config.seed + j)
      seconds = time.perf_counter() - start
      merged, head = ma.merge(trained)
      dense, enc_n = inference.fold(merged, lc2.enc, lc2.masks, lang, head)
      cer_new = inference.cer_of(dense, enc_n, te, voc)
      if method == "full_ft":
        old_params, old_lc = dict(merged, head=params["head"]), lc
      else:
        old_params, old_lc = merged, lc2
      cer_old_after = _cer_table(old_params, old_lc, test_old, vocab, lang_ids)
      probe_after = _probe_logits(old_params, old_lc, test_old[old[0]], 0)
      before = results["stage1"][base_method]["cer"]
      results["stage2"][code][method] = {
          "cer": cer_new, "trainable_params": int(model.count(new_trainable)),
          "first_loss": float(losses[:5].mean()), "final_loss": float(losses[-10:].mean()),
          "old_cer_before": before, "old_cer_after": cer_old_after,
          "forgetting": float(np.mean([cer_old_after[l] - before[l] for l in old])),
          "old_logits_bit_identical": bool(np.array_equal(probe_before, probe_after)),
          "s_per_step": seconds / tc.stage2_steps}
      logging.info("stage 2 %s %s: CER %.3f", code, method, cer_new)
      if method == "master_asr":
        recognizer[code] = (inference.fold(merged, lc2.enc, lc2.masks, lang, head), voc)
      stage2_trainable[method] = int(model.count(new_trainable))
  if "dense" in stage1:
    results["accounting"]["full_ft"] = ma.accounting("full_ft", *stage1["dense"])
  for method, n in stage2_trainable.items():
    results["accounting"].setdefault(method, {})["stage2_trainable"] = n

  if "master_asr" in stage1:
    p, lc = stage1["master_asr"]
    results["selection_jaccard"] = _plot_selections(p["masks"], lc.masks, old, os.path.join(run_dir,
                                                                                             "selections.png"))
    rec = inference.Recognizer({c: m for c, (m, _) in recognizer.items()}, {c: v for c, (_, v) in recognizer.items()},
                               fcfg)
    rec.save(os.path.join(run_dir, "recognizer.npz"))
  out = {"corpus": {k: v for k, v in built.items() if k != "manifests"}, "skipped_unfit": skipped,
         "stage0_cer": cer_stage0,
         "stage0_final_loss": info0["final_loss"], **results, "timings": timings,
         "vocab_size": vocab.size, "new_vocab_sizes": {l: v.size for l, v in new_vocab.items()},
         "total_seconds": time.perf_counter() - t0}
  _print_table(out, old, new)
  return out


def _print_table(out, old, new):
  print("\nStage 1: test CER per language (training languages)")
  print(f"{'method':<22}" + "".join(f"{l:>7}" for l in old) + f"{'avg':>7}{'per-lang stored':>17}")
  for m, r in out["stage1"].items():
    acc = out["accounting"].get(m, {})
    print(f"{m:<22}" + "".join(f"{r['cer'][l]:7.3f}" for l in old) + f"{r['avg_cer']:7.3f}"
          f"{acc.get('per_language_stored', 0):17,d}")
  for code in new:
    print(f"\nStage 2: new language {code!r}")
    print(f"{'method':<22}{'CER':>7}{'trainable':>12}{'old CER before':>16}{'after':>8}{'bit-identical':>15}")
    for m, r in out["stage2"][code].items():
      b = np.mean(list(r["old_cer_before"].values()))
      a = np.mean(list(r["old_cer_after"].values()))
      print(f"{m:<22}{r['cer']:7.3f}{r['trainable_params']:12,d}{b:16.3f}{a:8.3f}{str(r['old_logits_bit_identical']):>15}")
