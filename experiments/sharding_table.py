"""Per-device memory of Llama-3-8B on a TPU v5e-8: parameters + a 32k full KV cache vs a LaCache cache.

  python -m experiments.sharding_table [--context=32768] [--budget=2048] [--batches=1,8]

Shapes only: the parameters are `lacax.model.llama.param_shapes`, each cache is `jax.eval_shape` of the policy's
`init` at the capacity the policy needs for a `context`-token stream (`policy.slots`), and the bytes one device
holds come from `lacax.sharding`'s default rules on an abstract 8-device mesh (`MeshRules.shard_shape`, the same
fallback the real placement uses). Nothing is allocated and no TPU is needed. Prints a markdown table and
writes it with every figure to `<out>/<timestamp>.json`.

The LaCache budget defaults to 2048 slots per layer for a 32k context, 1/16 of the stream: the ratio of the
LaCache paper's long-context settings (a 4k-8k budget for 64k-128k streams), and a budget whose per-device
cache is within a few percent of the weights on every layout here.
"""

from __future__ import annotations

import datetime
import os

from absl import app
from absl import flags
import jax

from lacax import results as results_lib
from lacax import sharding
from lacax.cache.ladder import LadderPolicy
from lacax.cache.full import FullPolicy
from lacax.model import llama
from lacax.model.config import LLAMA3_8B, ModelConfig

_CONTEXT = flags.DEFINE_integer("context", 32768, "Tokens a sequence has streamed (the full cache holds them all).")
_BUDGET = flags.DEFINE_integer("budget", 2048, "LaCache cache_size (slots per layer).")
_SPAN = flags.DEFINE_integer("span", 16, "LaCache span.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "32"], "Sequences per batch.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 16.0, "HBM per chip in GiB (TPU v5e: 16).")
_OUT = flags.DEFINE_string("out", "results/sharding_table", "Output folder.")

# (label, mesh shape over ("data", "fsdp", "tensor"), rules laid over the defaults) for 8 chips.
LAYOUTS = (
    ("data 8 (replicated weights)", (8, 1, 1), ""),
    ("fsdp 8", (1, 8, 1), ""),
    # A batch too small to split over fsdp leaves the cache replicated; this rule lets kv heads take fsdp then.
    ("fsdp 8, kv_heads=tensor+fsdp", (1, 8, 1), "kv_heads=tensor+fsdp"),
    ("tensor 8", (1, 1, 8), ""),
    ("fsdp 2 x tensor 4", (1, 2, 4), ""),
)

GIB = 1024 ** 3


def memory_rows(cfg: ModelConfig, context: int, budget: int, span: int, batches: list[int],
                layouts=LAYOUTS) -> list[dict]:
  """One row per (layout, batch): per-device GiB of the parameters and of each cache, and totals."""
  policies = {"full": FullPolicy(), "lacache": LadderPolicy(span=span, cache_size=budget, start_size=4)}
  params = llama.param_shapes(cfg)
  rows = []
  for label, shape, overrides in layouts:
    rules = sharding.MeshRules(sharding.abstract_mesh(shape), sharding.parse_rules(overrides))
    param_bytes = rules.param_bytes(params)
    for batch in batches:
      row = {"layout": label, "mesh": dict(zip(sharding.MESH_AXES, shape)), "rules": overrides, "batch": batch,
             "params_gib": param_bytes / GIB}
      for name, policy in policies.items():
        slots = policy.decode_capacity(cfg, context)
        cache = jax.eval_shape(lambda p=policy, s=slots: p.init(cfg, batch, s))
        row[f"{name}_slots"] = slots
        row[f"{name}_cache_gib"] = rules.cache_bytes(cache) / GIB
        row[f"{name}_total_gib"] = row["params_gib"] + row[f"{name}_cache_gib"]
      rows.append(row)
  return rows


def markdown(rows: list[dict], cfg: ModelConfig, context: int, budget: int, hbm_gib: float) -> str:
  """The table as markdown (GiB per device; totals over the HBM marked)."""
  mark = lambda total: f"{total:.2f}" + ("" if total <= hbm_gib else " ✗")  # noqa: E731
  lines = [
      f"Per-device memory (GiB) of {cfg.name} ({cfg.dtype}) on a v5e-8 ({hbm_gib:g} GiB HBM per chip; "
      f"✗ = over): full cache of {context} tokens vs LaCache of {budget} slots per layer "
      f"({rows[0]['lacache_slots']} allocated).",
      "",
      "| layout | batch | params | full cache | params + full | LaCache cache | params + LaCache |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(f"| {r['layout']} | {r['batch']} | {r['params_gib']:.2f} | {r['full_cache_gib']:.2f} | "
                 f"{mark(r['full_total_gib'])} | {r['lacache_cache_gib']:.3f} | {mark(r['lacache_total_gib'])} |")
  return "\n".join(lines)


def main(argv):
  del argv
  cfg = LLAMA3_8B
  batches = [int(b) for b in _BATCHES.value]
  rows = memory_rows(cfg, _CONTEXT.value, _BUDGET.value, _SPAN.value, batches)
  table = markdown(rows, cfg, _CONTEXT.value, _BUDGET.value, _HBM_GIB.value)
  print(table)
  os.makedirs(_OUT.value, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  path = os.path.join(_OUT.value, f"{stamp}.json")
  results_lib.write_json(path, {"model": cfg.name, "context": _CONTEXT.value, "budget": _BUDGET.value,
                                "span": _SPAN.value, "hbm_gib": _HBM_GIB.value, "rules": dict(sharding.DEFAULT_RULES),
                                "rows": rows, "table": table, **results_lib.provenance()})
  print(f"\nwritten: {path}")


if __name__ == "__main__":
  app.run(main)
