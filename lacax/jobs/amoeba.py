"""The AmoebaLLM job: calibrate, one-for-all fine-tune, evaluate the subnet grid against the baselines.

Stages (each a library call of `lacax.subnets` / `lacax.train`):
  1. data: packed text rows split into calibration, held-out and training rows (or Alpaca-style instruction
     records for the fine-tuning, `data.instructions`);
  2. calibration on the base model: FLAP activation statistics -> nested width masks; the DP layer table over
     calibration perplexity (its evaluation count is recorded); ShortGPT block influence; uniform dropping;
  3. one-for-all fine-tuning of the SMoL adapters with sandwich sampling and balanced in-place distillation
     (`lacax.train.Trainer`: checkpoints, resume, metrics.jsonl, loss curve);
  4. held-out perplexity of every grid subnet before and after fine-tuning, and of the baselines at the
     configured parameter ratios; table (stdout), results.json, a Pareto plot; the chosen subnets exported as
     sliced static models (`lacax.subnets.export`).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lacax import jobs
from lacax import train
from lacax.subnets import calibrate, depth, execute, export, oneforall, smol, width
from lacax.subnets.shape import SubnetSpace


@functools.partial(jax.jit, static_argnames=("cfg", "smol_cfg"))
def _nll_sum(base, batch, arrays, smol_params, cfg, smol_cfg):
  logits = execute.subnet_logits(base, batch["tokens"], batch["positions"], cfg, arrays, smol_params, smol_cfg)
  nll = train.token_nll(logits, batch["targets"])
  return jnp.sum(nll * batch["mask"]), jnp.sum(batch["mask"])


def _ppl(base, batches, arrays, cfg, smol_params=None, smol_cfg=None) -> float:
  total = count = 0.0
  for b in batches:
    s, n = _nll_sum(base, b, arrays, smol_params, cfg, smol_cfg)
    total, count = total + float(s), count + float(n)
  return float(np.exp(total / max(count, 1.0)))


def _space_for(strategy: depth.DepthStrategy, masks: width.WidthMasks, widths, min_depth: int) -> SubnetSpace:
  return SubnetSpace(strategy, masks, tuple(widths), min_depth)


def _plot(rows: list[dict[str, Any]], grid_before, grid_after, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, grid, marker in (("AmoebaLLM grid, before fine-tuning", grid_before, "x"),
                              ("AmoebaLLM grid, after fine-tuning", grid_after, "o")):
    if grid:
      ax.scatter([g["fraction"] for g in grid], [g["ppl"] for g in grid], marker=marker, label=label, alpha=0.6)
  for method in sorted({r["method"] for r in rows} - {"amoeba", "amoeba_before"}):
    pts = sorted((r["fraction"], r["ppl"]) for r in rows if r["method"] == method)
    ax.plot(*zip(*pts), marker="s", label=method)
  ax.set_xlabel("fraction of decoder attention + FFN parameters")
  ax.set_ylabel("held-out perplexity")
  ax.set_yscale("log")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict[str, Any]:
  t_start = time.perf_counter()
  model = jobs.model_from_config(config)
  cfg, base, tok = model.cfg, model.params, model.tokenizer
  if tok is None:
    raise ValueError(f"model.path={config.model.path!r} has no tokenizer; the amoeba job needs one")
  L = cfg.num_layers
  min_depth = config.depth.min_depth or max(1, round(2 * L / 3))
  if not 1 <= min_depth <= L:
    raise ValueError(f"depth.min_depth={min_depth} must be in [1, num_layers={L}]")
  widths = tuple(float(w) for w in config.width.widths)

  # 1. Data.
  d = config.data
  text = train.text_dataset(tok, d.path, seq_len=d.seq_len, batch_size=d.batch_size, max_chars=d.max_chars)
  need = d.calib_rows + d.eval_rows + d.batch_size
  if text.num_rows < need:
    raise ValueError(f"the text gives {text.num_rows} rows of data.seq_len={d.seq_len}; data.calib_rows + "
                     f"data.eval_rows + data.batch_size = {need} are needed")
  rest, held = text.split(d.eval_rows)
  rest, calib = rest.split(d.calib_rows)
  fine_tune = train.instruction_dataset(tok, d.instructions, seq_len=d.seq_len, batch_size=d.batch_size) \
      if d.instructions else rest
  held_batches = [jax.tree.map(jnp.asarray, b) for b in held.eval_batches()]
  calib_batches = [jax.tree.map(jnp.asarray, b) for b in calib.eval_batches()]
  calib_tokens = [np.asarray(b["tokens"]) for b in calib.eval_batches()]
  logging.info("rows: %d calibration, %d held-out, %d fine-tuning", calib.num_rows, held.num_rows,
               fine_tune.num_rows)

  # 2. Calibration.
  t0 = time.perf_counter()
  stats, influence = calibrate.collect_statistics(base, cfg, calib_tokens)
  all_widths = sorted(set(widths) | set(float(r) for r in config.eval.ratios) | {1.0}, reverse=True)
  masks = width.flap_width_masks(stats, base["layers"]["wo"], base["layers"]["w_down"], cfg, all_widths,
                                 rule=config.width.rule)
  masks.save(os.path.join(run_dir, "width_masks.npz"))
  metric = calibrate.DepthMetric(base, cfg, calib_tokens, perplexity=config.depth.metric == "perplexity")
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  total_evals = depth.dp_evaluation_count(L, config.depth.keep_last, L - min_depth)
  bar = tqdm(total=total_evals, desc="DP layer selection", unit="eval", dynamic_ncols=True)
  signature = depth.model_signature(cfg)
  dp = depth.dp_layer_selection(metric, L, min_layers=min_depth, keep_last=config.depth.keep_last,
                                progress=lambda done, total: bar.update(done - bar.n), model=signature)
  bar.close()
  dp.save(os.path.join(run_dir, "depth_strategy.json"))
  # Baselines may remove more layers than the trained grid (up to half the layers, for the 50% ratio).
  base_min = max(1, min(min_depth, L // 3))
  baselines = {"uniform": depth.uniform_strategy(L, min_layers=base_min, keep_last=config.depth.keep_last,
                                                 model=signature),
               "shortgpt": depth.block_influence_strategy(influence, min_layers=base_min,
                                                          keep_last=config.depth.keep_last, model=signature)}
  calib_seconds = time.perf_counter() - t0
  space = _space_for(dp, masks, widths, min_depth)

  # 3. One-for-all fine-tuning.
  smol_cfg = smol.SMoLConfig(num_experts=config.smol.num_experts, top_k=config.smol.top_k, rank=config.smol.rank,
                             alpha=config.smol.alpha, router_hidden=config.smol.router_hidden,
                             targets=tuple(config.smol.targets))
  ofa = oneforall.OneForAllConfig(kd_weight=config.amoeba.kd_weight, balancing=config.amoeba.balancing,
                                  num_random=config.amoeba.num_random,
                                  reference_kd_mask=config.amoeba.reference_kd_mask, seed=config.amoeba.seed)
  params = {"base": base, "smol": smol.init_smol(jax.random.PRNGKey(config.amoeba.seed), base,
                                                 L + len(widths), smol_cfg)}
  labels = oneforall.labels(params)
  tc = config.train
  opt, schedule = train.make_optimizer(train.OptimizerConfig(
      learning_rate=tc.learning_rate, schedule=tc.schedule, warmup_steps=tc.warmup_steps, clip_norm=tc.clip_norm,
      weight_decay=tc.weight_decay), tc.steps)
  state = train.create_train_state(params, opt, labels=labels, seed=config.amoeba.seed)
  trainer = train.Trainer(oneforall.sandwich_loss_fn(cfg, smol_cfg, ofa), opt, train.TrainConfig(
      steps=tc.steps, compute_dtype=tc.compute_dtype, log_every=tc.log_every, checkpoint_every=tc.checkpoint_every,
      keep_checkpoints=tc.keep_checkpoints), schedule=schedule, labels=labels,
      tokens_of=lambda b: int(np.size(b["tokens"])) * (2 + ofa.num_random))
  t0 = time.perf_counter()
  state, records = trainer.fit(
      state, lambda s: oneforall.sandwich_batch(fine_tune.batch(s), s, space, cfg, ofa), run_dir=run_dir,
      checkpoint_dir=os.path.join(run_dir, "checkpoints") if tc.checkpoint_every else None,
      run_config=config.to_dict())
  train_seconds = time.perf_counter() - t0
  trained = train.combine(state.trainable, state.frozen)["smol"]

  # 4. Evaluation.
  t0 = time.perf_counter()
  full_ppl = _ppl(base, held_batches, space.arrays(space.largest, cfg), cfg)
  grid_before, grid_after = [], []
  shapes = space.grid()
  if not config.eval.grid:  # only the candidates of the ratios (the shapes nearest each, within 0.03)
    fractions = {s: space.kept_fraction(s, cfg) for s in shapes}
    keep = set()
    for ratio in config.eval.ratios:
      near = min(abs(f - float(ratio)) for f in fractions.values())
      keep |= {s for s, f in fractions.items() if abs(f - float(ratio)) <= near + 0.03}
    shapes = [s for s in shapes if s in keep]
  for shape in shapes:
    arrays = space.arrays(shape, cfg)
    frac = space.kept_fraction(shape, cfg)
    grid_before.append({"shape": shape.label(), "depth": shape.depth, "width": shape.width, "fraction": frac,
                        "ppl": _ppl(base, held_batches, arrays, cfg)})
    grid_after.append({"shape": shape.label(), "depth": shape.depth, "width": shape.width, "fraction": frac,
                       "ppl": _ppl(base, held_batches, arrays, cfg, trained, smol_cfg),
                       "calib_ppl": _ppl(base, calib_batches, arrays, cfg, trained, smol_cfg)})
  rows = []
  no_width = width.WidthMasks(widths=(1.0,), group_mask={1.0: masks.group_mask[1.0]},
                              ffn_mask={1.0: masks.ffn_mask[1.0]}, attn_bias={1.0: masks.attn_bias[1.0]},
                              ffn_bias={1.0: masks.ffn_bias[1.0]})
  exported = []
  for ratio in config.eval.ratios:
    ratio = float(ratio)
    m = int(round((1.0 - ratio) * L))
    for name, strategy in baselines.items():
      if m > strategy.max_removed:
        continue
      sp = _space_for(strategy, no_width, (1.0,), L - strategy.max_removed)
      shape = sp.shape(L - m, 1.0)
      rows.append({"ratio": ratio, "method": name, "shape": shape.label(), "fraction": sp.kept_fraction(shape, cfg),
                   "ppl": _ppl(base, held_batches, sp.arrays(shape, cfg), cfg)})
    flap_space = _space_for(dp, masks, all_widths, L)
    shape = flap_space.shape(L, ratio)
    rows.append({"ratio": ratio, "method": "flap", "shape": shape.label(),
                 "fraction": flap_space.kept_fraction(shape, cfg),
                 "ppl": _ppl(base, held_batches, flap_space.arrays(shape, cfg), cfg)})
    # AmoebaLLM: the grid shape nearest the ratio, ties (within 0.03) broken by calibration perplexity.
    if grid_after:
      near = min(abs(g["fraction"] - ratio) for g in grid_after)  # the same rule as the candidates above
      pick = min((g for g in grid_after if abs(g["fraction"] - ratio) <= near + 0.03), key=lambda g: g["calib_ppl"])
      shape = space.shape(pick["depth"], pick["width"])
      before = next(g for g in grid_before if g["shape"] == pick["shape"])
      rows.append({"ratio": ratio, "method": "amoeba_before", "shape": pick["shape"], "fraction": pick["fraction"],
                   "ppl": before["ppl"]})
      rows.append({"ratio": ratio, "method": "amoeba", "shape": pick["shape"], "fraction": pick["fraction"],
                   "ppl": pick["ppl"]})
      if config.eval.export:
        sliced, sub_cfg, sizes = export.slice_subnet(base, cfg, space, shape, trained, smol_cfg)
        path = os.path.join(run_dir, "subnets", f"{ratio:.2f}_{shape.label()}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        export.save_subnet(path, sliced, sub_cfg, sizes, shape=shape, source=model.source,
                           tokenizer=model.tokenizer, extra={"ratio": ratio, "fraction": pick["fraction"]})
        exported.append({"ratio": ratio, "shape": shape.label(), "path": path,
                         "params": export.sliced_param_count(sliced, sub_cfg)})
  eval_seconds = time.perf_counter() - t0

  print(f"\nAmoebaLLM on {cfg.name}: held-out perplexity (full model {full_ppl:.3f}); fraction = kept decoder "
        "attention+FFN parameters")
  print(f"{'ratio':>6} {'method':<14} {'shape':<12} {'fraction':>8} {'ppl':>10}")
  for r in rows:
    print(f"{r['ratio']:>6.2f} {r['method']:<14} {r['shape']:<12} {r['fraction']:>8.3f} {r['ppl']:>10.3f}")
  _plot(rows, grid_before, grid_after, os.path.join(run_dir, "pareto.png"),
        f"AmoebaLLM subnets of {cfg.name} ({tc.steps} fine-tuning steps)")
  return {
      "full_ppl": full_ppl, "table": rows, "grid_before": grid_before, "grid_after": grid_after,
      "exported": exported,
      "depth": {"dp": dp.to_json(), "uniform": baselines["uniform"].to_json(),
                "shortgpt": baselines["shortgpt"].to_json(), "block_influence": [float(v) for v in influence],
                "dp_evaluations": dp.num_evaluations, "metric_calls": metric.calls},
      "width": {"widths": list(all_widths),
                "kept_fraction": {str(w): width.kept_fraction(masks.group_mask[w], masks.ffn_mask[w], cfg)
                                  for w in all_widths}},
      "train": {"steps": tc.steps, "final": records[-1] if records else None},
      "seconds": {"calibration": calib_seconds, "train": train_seconds, "eval": eval_seconds,
                  "total": time.perf_counter() - t_start},
      "model_fingerprint": model.fingerprint(),
  }
