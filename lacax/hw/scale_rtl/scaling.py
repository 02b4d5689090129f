"""Repeated sampling and the pass@k-vs-compute curve (tokens generated as compute).

`repeated_sampling` draws `sampling.n` answers per problem through the harness (`lacax.hw.bench.harness`:
generated, assembled, simulated in the sandbox) and counts the tokens of each answer
(`lacax.hw.scale_rtl.reflect.count_tokens`). `compute_curve` turns (n, c, tokens) per problem into the curve:
for every k <= n, the unbiased pass@k (exact per problem) against the expected tokens of k samples
(k x the mean tokens per sample). Reflection runs put a point per round on the same axes (pass@1 of the answer
after round r against the mean tokens generated up to round r).
"""

from __future__ import annotations

from typing import Any, Sequence

from lacax.hw.backends.base import Sampling
from lacax.hw.bench import harness, passk
from lacax.hw.bench.problem import render_prompt
from lacax.hw.scale_rtl.reflect import count_tokens


def repeated_sampling(problems: Sequence[Any], backend, sampling: Sampling, *, style: str = "chat",
                      simulator: str = "iverilog", workers: int | None = None) -> dict[str, Any]:
  """n samples per problem: per-problem (n, c, tokens per sample), and the curve."""
  prompts = [render_prompt(p, style) for p in problems]
  want_lp = backend.describe().get("kind") == "openai_http" and "logprobs" in getattr(backend, "capabilities", ())
  if want_lp and not sampling.logprobs:
    import dataclasses  # pylint: disable=g-import-not-at-top
    sampling = dataclasses.replace(sampling, logprobs=True)  # the server's token count
  comps = backend.generate(prompts, sampling)
  results = harness.score_answers(problems, [[c.text for c in cs] for cs in comps], simulator, workers)
  per = []
  for p, r, cs in zip(problems, results, comps):
    counts = [count_tokens(backend, c, sampling.max_tokens) for c in cs]
    per.append({"task_id": p.task_id, "n": r.n, "c": r.c, "categories": [s.category for s in r.samples],
                "tokens": [n for n, _ in counts], "counted": sorted({k for _, k in counts})})
  return {"problems": per, "curve": compute_curve(per)}


def compute_curve(per: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
  """[{k, pass@k, tokens}] for k = 1..min n: tokens = k x the mean tokens per sample over every problem."""
  if not per:
    return []
  n = min(p["n"] for p in per)
  mean_tokens = sum(sum(p["tokens"]) for p in per) / max(1, sum(len(p["tokens"]) for p in per))
  return [{"k": k, "pass@k": passk.mean_pass_at_k([(p["n"], p["c"]) for p in per], k), "tokens": k * mean_tokens}
          for k in range(1, n + 1)]


def reflection_scores(problems: Sequence[Any], traces: Sequence[Sequence[Any]], rounds: int, *,
                      simulator: str = "iverilog", workers: int | None = None) -> list[dict[str, Any]]:
  """Per round r = 0..rounds: pass@1 of the answer after round r (`Trace.code_after`) over every sample, and
  the mean tokens generated up to round r (one run with N rounds scores every N' <= N; see `reflect`)."""
  out = []
  for r in range(rounds + 1):
    answers = [[t.code_after(r, p.top) for t in ts] for p, ts in zip(problems, traces)]
    res = harness.score_answers(problems, answers, simulator, workers)
    tokens = [sum(x.tokens for x in t.rounds[:r + 1]) for ts in traces for t in ts]
    out.append({"rounds": r, "pass@1": passk.mean_pass_at_k([(x.n, x.c) for x in res], 1),
                "passed": sum(x.c for x in res), "samples": sum(x.n for x in res),
                "tokens": sum(tokens) / max(1, len(tokens)),
                "reached": sum(len(t.rounds) > r for ts in traces for t in ts)})
  return out
