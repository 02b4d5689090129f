"""The Edge-LLM job: sensitivity -> policy search for a memory budget -> compress -> adaptive layer tuning ->
evaluation with and without voting, plus the hardware scheduling model's latency of each policy.

Units (`lacax.runs`: each written atomically as it finishes; `--config.resume=<run dir>` skips finished ones):
  sensitivity         per-layer prune / quant output error on calibration rows (`lacax.compress.sensitivity`);
  policies            the LUC policy searched for the budget, the reference allocation at the target sparsity,
                      and uniform policies at equal (or lower) memory (`lacax.compress.policy`);
  compress/<name>     each policy applied (`apply_policy`): held-out perplexity, resident and modelled bytes;
  schedule/<name>     modelled decode latency of each policy, searched vs default mappings;
  tune                adaptive layer tuning of the searched policy's model (`lacax.compress.tuning`; the
                      adapters and heads saved as npz);
  eval                two-stream exits, voting and the final head: held-out perplexity and multiple-choice
                      accuracy per exit, of the vote and of the best single exit, before and after tuning.
Table on stdout, results.json, plots (per-layer sparsity / bits; perplexity vs memory).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lacax import jobs
from lacax import runs, train
from lacax.compress import apply as apply_lib
from lacax.compress import policy as policy_lib
from lacax.compress import schedule as sched_lib
from lacax.compress import sensitivity as sens_lib
from lacax.compress import tuning, voting
from lacax.errors import ValidationError
from lacax.model import llama
from lacax.model import lora as lora_lib
from lacax.train.lm import LORA_SHORT_NAMES


def validate(config) -> None:
  problems = []
  c = config.compress
  if not 0.0 < c.budget_fraction <= 1.0:
    problems.append(f"compress.budget_fraction={c.budget_fraction}; expected a fraction in (0, 1]")
  if not 0.0 <= c.target_sparsity < 1.0:
    problems.append(f"compress.target_sparsity={c.target_sparsity}; expected a value in [0, 1)")
  for b in tuple(c.search_bits) + tuple(c.uniform_bits):
    if b not in tuple(config.sensitivity.bits):
      problems.append(f"compress bits {b} is not among sensitivity.bits={tuple(config.sensitivity.bits)} (the "
                      "search needs its measured error)")
  unknown = [t for t in config.tuning.targets if LORA_SHORT_NAMES.get(t, t) not in llama.LORA_TARGETS]
  if unknown:
    problems.append(f"tuning.targets has unknown projections {unknown}; expected q, k, v, o, gate, up, down")
  try:
    tuning.TuningConfig(stride=config.tuning.stride, exit_head=config.tuning.exit_head,
                        exit_norm=config.tuning.exit_norm)
  except ValueError as e:
    problems.append(str(e))
  if config.train.steps < 1:
    problems.append(f"train.steps={config.train.steps} must be >= 1")
  if problems:
    raise ValidationError(problems, what="the edge_llm config")


def _dense(params: dict[str, Any]) -> dict[str, Any]:
  """The compressed model with packed weights dequantized and bit-width segments stacked again (the same
  weights: tuning differentiates through dense frozen weights, as the reference's fake quantization does).
  Activation quantization is not kept (the job's policies quantize weights only)."""
  out = jax.tree.map(lambda w: w.dense() if isinstance(w, llama.ProjectedWeight) else w, params,
                     is_leaf=lambda w: isinstance(w, llama.ProjectedWeight))
  if isinstance(out["layers"], (list, tuple)):
    out["layers"] = jax.tree.map(lambda *xs: jnp.concatenate(xs), *out["layers"])
  return out


def _tcfg(config) -> tuning.TuningConfig:
  t = config.tuning
  lcfg = lora_lib.LoraConfig(rank=t.rank, alpha=t.alpha, dropout=t.dropout,
                             targets=tuple(LORA_SHORT_NAMES.get(x, x) for x in t.targets))
  return tuning.TuningConfig(stride=t.stride, exit_head=t.exit_head, exit_norm=t.exit_norm, lora=lcfg)


def _precisions(policy: policy_lib.CompressionPolicy, dense_bits: int) -> list[sched_lib.LayerPrecision]:
  out = []
  for l in range(policy.num_layers):
    w = policy.w_bits[l] or dense_bits
    a = policy.a_bits[l] or dense_bits
    kv = policy.kv_bits[l] or dense_bits
    out.append(sched_lib.LayerPrecision(w_bits=w, a_bits=a, kv_bits=kv, sparsity=policy.sparsity[l]))
  return out


def _exit_eval(tree, cfg, tcfg, batches, split, mc_ids, mc_labels) -> dict[str, Any]:
  """Per-exit / vote / final perplexity on held-out batches and multiple-choice accuracy."""
  @jax.jit
  def ppl_sums(tree, b):
    exits, final = tuning.exit_logits(tree, b["tokens"], b["positions"], cfg, tcfg)
    return voting.nll_sums(exits, final, b["targets"], b["mask"])

  total = None
  for b in batches:
    s = jax.device_get(ppl_sums(tree, {k: jnp.asarray(v) for k, v in b.items()}))
    total = s if total is None else jax.tree.map(np.add, total, s)
  out = voting.perplexities(total)

  @jax.jit
  def last_logits(tree, tokens, lengths):
    t = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    positions = jnp.where(t < lengths[:, None], t, -1)
    exits, _ = tuning.exit_logits(tree, tokens, positions, cfg, tcfg)
    return jnp.take_along_axis(exits, (lengths - 1)[None, :, None, None], axis=2)[:, :, 0]

  logits, ids, labels = [], [], []
  for batch in split.batches:
    keep = batch.index >= 0
    lg = jax.device_get(last_logits(tree, jnp.asarray(batch.tokens), jnp.asarray(batch.lengths)))
    logits.append(lg[:, keep])
    ids.append(batch.candidates[keep])
    labels.append(np.asarray([mc_labels[k] for k in batch.index[keep]]))
  width = max(i.shape[1] for i in ids)
  ids = np.concatenate([np.pad(i, ((0, 0), (0, width - i.shape[1])), constant_values=-1) for i in ids])
  out["mc"] = voting.mc_report(jnp.asarray(np.concatenate(logits, axis=1)), ids, np.concatenate(labels))
  del mc_ids
  return out


def _plots(run_dir, policies, points, cfg) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
  layers = np.arange(cfg.num_layers)
  for name, p in policies.items():
    a1.plot(layers, p["sparsity"], marker="o", label=f"{name} sparsity")
  a1b = a1.twinx()
  for name, p in policies.items():
    a1b.step(layers, [b or 32 for b in p["w_bits"]], where="mid", linestyle="--", alpha=0.6, label=f"{name} bits")
  a1.set_xlabel("layer")
  a1.set_ylabel("sparsity")
  a1b.set_ylabel("weight bits")
  a1.legend(fontsize=7, loc="upper left")
  a1.set_title("per-layer sparsity and bits")
  for name, pt in points.items():
    a2.scatter(pt["modelled_bytes"] / 2 ** 20, pt["perplexity"], label=name)
  a2.set_xlabel("modelled MiB")
  a2.set_ylabel("held-out perplexity")
  a2.set_yscale("log")
  a2.legend(fontsize=7)
  a2.set_title("perplexity vs memory")
  fig.tight_layout()
  fig.savefig(os.path.join(run_dir, "edge_llm.png"), dpi=120)
  plt.close(fig)


def run(config, run_dir) -> dict[str, Any]:
  run_dir = runs.as_run_dir(run_dir)
  t_start = time.perf_counter()
  model = jobs.model_from_config(config)
  cfg = model.cfg
  d = config.data
  data = train.text_dataset(model.tokenizer, d.path, seq_len=d.seq_len, batch_size=d.batch_size,
                            max_chars=d.max_chars)
  rest, calib = data.split(d.calib_rows)
  train_data, held = rest.split(d.eval_rows)
  calib_tokens = calib.ids[:, :-1]
  eval_tokens = held.ids
  held_batches = held.eval_batches()

  # 1. sensitivity
  table_path = run_dir.file("sensitivity.json")

  def measure():
    table = sens_lib.measure(model.params, cfg, calib_tokens, ratios=tuple(config.sensitivity.ratios),
                             bits=tuple(config.sensitivity.bits), method=config.sensitivity.method)
    table.save(table_path)
    return {"path": table_path, "prune": table.prune.tolist(), "quant": table.quant.tolist()}

  run_dir.unit("sensitivity", measure)
  table = sens_lib.SensitivityTable.load(table_path, params=model.params, cfg=cfg)

  # 2. policies
  c = config.compress
  group = c.group_size or None
  dense_bytes = policy_lib.policy_bytes(policy_lib.uniform_policy(cfg, 0.0, None), cfg)
  fixed = policy_lib.fixed_bytes(cfg)  # embedding, head, norms: kept float32 by every policy
  budget = fixed + c.budget_fraction * (dense_bytes - fixed)

  def make_policies():
    common = dict(method=c.method, storage=c.storage, group_size=group)
    out = {"luc_search": policy_lib.search_policy(table, cfg, budget, bits=tuple(c.search_bits), **common)}
    out["luc_reference"] = policy_lib.luc_policy(table, cfg, c.target_sparsity, base_bits=max(c.search_bits),
                                                 **common)
    for bits in c.uniform_bits:  # the least sparse uniform policy at these bits within the budget
      for s in (0.0,) + tuple(sorted(table.ratios)):
        p = policy_lib.uniform_policy(cfg, s, bits, **common)
        if policy_lib.policy_bytes(p, cfg) <= budget:
          out[f"uniform_{bits}bit"] = p
          break
    return {k: v.to_json() for k, v in out.items()}

  policies = {k: policy_lib.CompressionPolicy.from_json(v) for k, v in run_dir.unit("policies", make_policies).items()}
  for name, p in policies.items():
    p.save(run_dir.file("policies", f"{name}.json"))

  # 3. compress and measure every policy; 4. the schedule model
  device = sched_lib.Device(buffer_bytes=config.schedule.buffer_bytes,
                            dram_bytes_per_cycle=config.schedule.dram_bytes_per_cycle, lanes=config.schedule.lanes,
                            sparse_skip=config.schedule.sparse_skip)
  compressed_cache = {}

  def compressed(name):
    if name not in compressed_cache:
      compressed_cache[name] = apply_lib.apply_policy(model.params, cfg, policies[name], calib_tokens)
    return compressed_cache[name]

  points = {"dense": run_dir.unit("compress/dense", lambda: {
      **apply_lib.measure_memory_point(model.params, cfg, eval_tokens), "modelled_bytes": dense_bytes})}
  schedules = {}
  for name in policies:
    points[name] = run_dir.unit(f"compress/{name}", lambda name=name: apply_lib.measure_memory_point(
        compressed(name), cfg, eval_tokens, policies[name]))
    schedules[name] = run_dir.unit(f"schedule/{name}", lambda name=name: {
        k: v for k, v in sched_lib.schedule_model(cfg, _precisions(policies[name], 16), device, tokens=1,
                                                  context=config.schedule.context).items() if k != "layers"})
  schedules["dense"] = run_dir.unit("schedule/dense", lambda: {
      k: v for k, v in sched_lib.schedule_model(cfg, [sched_lib.LayerPrecision()] * cfg.num_layers, device,
                                                tokens=1, context=config.schedule.context).items() if k != "layers"})

  # 5. adaptive layer tuning of the searched policy's model
  tcfg = _tcfg(config)
  base = _dense(compressed("luc_search")) if not run_dir.has_unit("eval") else None
  tree_path = run_dir.file("tuned.npz")

  def tune():
    steps = config.train.steps
    opt_cfg = train.optimizer_config_from({k: v for k, v in config.train.to_dict().items()
                                           if k not in ("steps", "log_every")})
    opt, schedule = train.make_optimizer(opt_cfg, steps)
    tc = train.TrainConfig(steps=steps, log_every=config.train.log_every, progress=True)
    t0 = time.perf_counter()
    result = tuning.tune(base, cfg, tcfg, train_data.batch, max_steps=steps, optimizer=opt, schedule=schedule,
                         train_config=tc, seed=config.tuning.seed, run_dir=run_dir.file("tuning"),
                         checkpoint_dir=run_dir.file("tuning", "checkpoints"))
    seconds = time.perf_counter() - t0
    flat = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path({"lora": result.tree["lora"],
                                                                 "heads": result.tree.get("heads", [])})[0]}
    np.savez(tree_path, **flat)
    per_phase = [{"phase": k, "first_loss": next(r["loss"] for r in result.records if r["phase"] == k),
                  "last_loss": [r["loss"] for r in result.records if r["phase"] == k][-1]}
                 for k in range(len(result.phases))]
    return {"phases": [list(p) for p in result.phases], "per_phase": per_phase, "seconds": seconds,
            "windows": [list(w) for w in tuning.windows(cfg.num_layers, tcfg.stride)]}

  tune_info = run_dir.unit("tune", tune)

  # 6. evaluation with and without voting, before and after tuning
  def evaluate():
    from lacax.act import tasks  # pylint: disable=g-import-not-at-top
    from lacax.eval import zero_shot  # pylint: disable=g-import-not-at-top

    task = tasks.offline_task(config.eval.mc_task, num_calibration=0, num_evaluation=config.eval.mc_examples)
    split = zero_shot.encode_split(task.evaluation, model.tokenizer, batch_size=config.eval.batch_size)
    labels = [e.label for e in task.evaluation]
    fresh = tuning.init_tree(base, cfg, tcfg, jax.random.PRNGKey(config.tuning.seed))
    saved = np.load(tree_path)
    tuned = dict(fresh)
    tuned["lora"] = jax.tree_util.tree_map_with_path(
        lambda path, _: jnp.asarray(saved["lora/" + "/".join(str(getattr(k, "key", k)) for k in path)]),
        fresh["lora"])
    if "heads" in fresh:
      tuned["heads"] = [jnp.asarray(saved[f"heads/{k}"]) for k in range(len(fresh["heads"]))]
    return {"before": _exit_eval(fresh, cfg, tcfg, held_batches, split, None, labels),
            "after": _exit_eval(tuned, cfg, tcfg, held_batches, split, None, labels)}

  ev = run_dir.unit("eval", evaluate)

  # Table, plots.
  print(f"\nEdge-LLM on {cfg.name}: budget {budget / 2 ** 20:.2f} MiB = float32 embedding/head/norms "
        f"{fixed / 2 ** 20:.2f} MiB + {c.budget_fraction:.2f} x the dense decoder layers' "
        f"{(dense_bytes - fixed) / 2 ** 20:.2f} MiB (modelled bytes; resident = what lacax holds)")
  print(f"{'policy':<16} {'mean sp':>8} {'mean bits':>9} {'modelled MiB':>12} {'resident MiB':>12} {'ppl':>10} "
        f"{'sched speedup':>13}")
  for name, pt in points.items():
    sp = schedules.get(name, {})
    print(f"{name:<16} {pt.get('mean_sparsity', 0.0):>8.3f} {pt.get('mean_w_bits', 32.0):>9.2f} "
          f"{pt['modelled_bytes'] / 2 ** 20:>12.2f} {pt['resident_bytes'] / 2 ** 20:>12.2f} {pt['perplexity']:>10.3f} "
          f"{schedules['dense']['latency_cycles'] / max(sp.get('latency_cycles', 1.0), 1.0):>13.2f}")
  for when in ("before", "after"):
    e = ev[when]
    print(f"\nexits {when} tuning: per-exit ppl {[round(x, 2) for x in e['per_exit_ppl']]}, vote {e['vote_ppl']:.2f}, "
          f"final head {e['final_ppl']:.2f}; MC ({config.eval.mc_task}) per exit "
          f"{[round(x, 3) for x in e['mc']['per_exit_accuracy']]}, vote {e['mc']['vote_accuracy']:.3f}, best "
          f"single {e['mc']['best_exit_accuracy']:.3f}")
  runs.safe_plot("edge_llm", _plots, run_dir.path, {k: v.to_json() for k, v in policies.items()}, points, cfg)
  logging.info("edge_llm done in %.1f s", time.perf_counter() - t_start)
  return {"budget_bytes": budget, "dense_bytes": dense_bytes, "policies": {k: v.to_json() for k, v in policies.items()},
          "memory_points": points, "schedule": schedules, "tuning": tune_info, "eval": ev,
          "tuning_config": {"stride": tcfg.stride, "exit_head": tcfg.exit_head, "exit_norm": tcfg.exit_norm,
                            "lora": dataclasses.asdict(tcfg.lora)},
          "seconds": time.perf_counter() - t_start, "model_fingerprint": model.fingerprint()}
