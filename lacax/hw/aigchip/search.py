"""GPT4AIGChip's design-space search (§IV): an evolutionary loop with tournament selection in which a proposer
(the backend, or a heuristic stand-in) writes the candidates, scored by real simulation and synthesis; and random
search at the same evaluation budget as the baseline.

`evolve(evaluator, proposer, config, space)`:

  1. `config.population` random designs (the same ones random search starts with at the same seed);
  2. until `config.budget` proposals are spent: two tournaments of `config.tournament` entrants drawn from the
     population (the best `config.population` fit designs so far) pick two parents; the proposer writes one child
     from them; the child is evaluated (`evaluate.Evaluator`: cached by design hash, so a repeated proposal costs
     no simulation, but it still spends one unit of budget, as any proposal does, parseable or not).

Only evaluations that passed simulation and synthesised have a fitness; a failed design never enters the
population and is never the reported best. Everything random is drawn from `numpy.random.default_rng(seed)` and
the backend's sampling seed is derived from (seed, proposal index), so equal budgets and seeds reproduce a run
exactly with a deterministic backend (scripted, or a local model).

Proposers:

  HeuristicProposer   mutation (one or two knobs to a neighbouring value) of a crossover of the parents: the
                      classic evolutionary algorithm without a language model
  BackendProposer     mode "config": the backend sees the knob space, the workload, the best and the failed
                      designs so far and the two parents, and answers with a JSON object of knobs;
                      mode "code": the knobs come from the heuristic, and the backend writes the `gemm_pe` module
                      for them from a demo-augmented prompt (`demos.select` + `demos.build_prompt`); the answer goes
                      through the auto-fixer before simulation
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lacax.hw.aigchip import demos as demos_lib
from lacax.hw.aigchip import template
from lacax.hw.backends import base

MODES = ("config", "code")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  budget: int = 24
  population: int = 6
  tournament: int = 3
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.budget, int) or self.budget < 1:
      raise ValueError(f"search.budget={self.budget!r} must be an integer >= 1")
    if not isinstance(self.population, int) or not 1 <= self.population <= self.budget:
      raise ValueError(f"search.population={self.population!r} must be an integer in [1, budget={self.budget}]")
    if not isinstance(self.tournament, int) or self.tournament < 1:
      raise ValueError(f"search.tournament={self.tournament!r} must be an integer >= 1")


def check_space(space: Mapping[str, Sequence[Any]]) -> dict[str, tuple[Any, ...]]:
  """The knob space as {knob: allowed values}, each a non-empty subset of `template.SPACE`."""
  out = {}
  for name in template.KNOB_NAMES:
    values = tuple(space.get(name, template.SPACE[name]))
    bad = [v for v in values if v not in template.SPACE[name]]
    if not values or bad:
      raise ValueError(f"space.{name}={values!r} must be a non-empty subset of {list(template.SPACE[name])}")
    out[name] = values
  unknown = sorted(set(space) - set(template.KNOB_NAMES))
  if unknown:
    raise ValueError(f"space has unknown knob(s) {unknown}; the knobs are {list(template.KNOB_NAMES)}")
  return out


def random_design(rng: np.random.Generator, space: Mapping[str, Sequence[Any]]) -> template.Design:
  return template.Design(**{k: space[k][int(rng.integers(len(space[k])))] for k in template.KNOB_NAMES})


def mutate(d: template.Design, rng: np.random.Generator, space: Mapping[str, Sequence[Any]]) -> template.Design:
  """One or two knobs moved to a neighbouring allowed value (categorical knobs: another value)."""
  knobs = d.to_json()
  names = [n for n in template.KNOB_NAMES if len(space[n]) > 1]
  if not names:
    return d
  for name in rng.choice(names, size=min(len(names), 1 + int(rng.integers(2))), replace=False):
    values = list(space[name])
    cur = values.index(knobs[name]) if knobs[name] in values else int(rng.integers(len(values)))
    if isinstance(values[0], str):
      knobs[name] = values[(cur + 1 + int(rng.integers(len(values) - 1))) % len(values)]
    else:
      step = int(rng.choice([-1, 1]))
      knobs[name] = values[min(max(cur + step, 0), len(values) - 1)] if 0 <= cur + step < len(values) \
          else values[cur - step]
  return template.Design(**knobs)


def crossover(a: template.Design, b: template.Design, rng: np.random.Generator) -> template.Design:
  ka, kb = a.to_json(), b.to_json()
  return template.Design(**{n: (ka if rng.random() < 0.5 else kb)[n] for n in template.KNOB_NAMES})


@dataclasses.dataclass
class Proposal:
  design: template.Design | None
  overrides: dict[str, str] = dataclasses.field(default_factory=dict)
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


class HeuristicProposer:
  """Mutation of a crossover of the two parents (no language model)."""

  name = "heuristic"

  def __init__(self, space: Mapping[str, Sequence[Any]]):
    self.space = space

  def propose(self, parents: Sequence[Mapping[str, Any]], history: Sequence[Mapping[str, Any]],
              rng: np.random.Generator, index: int) -> Proposal:
    del history, index
    a, b = (template.Design.from_json(p["design"]) for p in parents)
    return Proposal(mutate(crossover(a, b, rng), rng, self.space), info={"proposer": self.name})


def _fmt(rec: Mapping[str, Any]) -> str:
  d = json.dumps(rec["design"], sort_keys=True)
  if rec.get("ok"):
    return f"{d} -> cycles {rec['cycles']}, cells {rec['cells']}, fitness {rec['fitness']:.3f}"
  return f"{d} -> FAILED ({rec.get('category')}: {str(rec.get('detail', ''))[:100]})"


def config_prompt(parents: Sequence[Mapping[str, Any]], history: Sequence[Mapping[str, Any]],
                  space: Mapping[str, Sequence[Any]], workload: template.Workload, area_weight: float,
                  shown: int = 5) -> list[dict[str, str]]:
  """The chat prompt of one config proposal."""
  fit = sorted((r for r in history if r.get("ok")), key=lambda r: -r["fitness"])[:shown]
  failed = [r for r in history if not r.get("ok") and r.get("design")][-3:]
  knobs = "\n".join(f"  {k}: one of {json.dumps(list(v))}" for k, v in space.items())
  lines = [
      f"We are tuning a GEMM accelerator (C[{workload.m}x{workload.n}] = A[{workload.m}x{workload.k}] @ "
      f"B[{workload.k}x{workload.n}], {workload.width}-bit) built from a template with these knobs:",
      knobs,
      "rows x cols is the PE array; dataflow os/ws/is is output-, weight- or input-stationary; banks words move "
      "per cycle between a buffer and the array; banks * buf_depth must hold a whole matrix; the array must "
      "divide the matrix dimensions it is mapped to.",
      f"Lower is better: log2(cycles) + {area_weight:g} * log2(cells).",
      "Best designs so far:", *(f"  {_fmt(r)}" for r in fit),
  ]
  if failed:
    lines += ["Recent failures:", *(f"  {_fmt(r)}" for r in failed)]
  lines += ["Parents chosen by tournament:", *(f"  Parent {i + 1}: {_fmt(p)}" for i, p in enumerate(parents)),
            "Propose one new design that combines and improves the parents. Answer with one JSON object with "
            f"the keys {', '.join(template.KNOB_NAMES)} and nothing else."]
  return [{"role": "system", "content": "You are an expert accelerator architect exploring a design space."},
          {"role": "user", "content": "\n".join(lines)}]


_KNOB_RE = re.compile(r'"(' + "|".join(template.KNOB_NAMES) + r')"\s*:\s*("[^"]*"|-?\d+(?:\.\d+)?)')


def parse_design(text: str, base_design: template.Design | None = None, lenient: bool = True
                 ) -> tuple[template.Design, bool]:
  """The design in a backend's answer and whether the lenient path read it.

  The first JSON object holding knob names wins; knobs it leaves out come from `base_design` (the first parent;
  default the template's defaults). With `lenient`, an answer with no such object (cut off by max_tokens, or
  broken JSON) is read as its `"knob": value` pairs, the last of each knob counting. ValueError if neither
  finds a knob, or a value is not a valid knob value.
  """
  fill = (base_design or template.Design()).to_json()
  for m in re.finditer(r"\{[^{}]*\}", text, re.DOTALL):
    try:
      obj = json.loads(m.group(0))
    except json.JSONDecodeError:
      continue
    if isinstance(obj, dict) and set(obj) & set(template.KNOB_NAMES):
      return template.Design.from_json({**fill, **{k: v for k, v in obj.items() if k in template.KNOB_NAMES}}), False
  if lenient:
    pairs = {k: json.loads(v) for k, v in _KNOB_RE.findall(text)}
    if pairs:
      return template.Design.from_json({**fill, **pairs}), True
  raise ValueError(f"no JSON object of knobs in the answer {text[:160]!r}")


def pe_interface(design: template.Design) -> str:
  """The port list the model-written `gemm_pe` must have (the template's own header)."""
  code = template.PE_OS if design.dataflow == "os" else template.PE_ST
  start = re.search(r"\bmodule\b", code).start()
  return code[start:code.index(");", start) + 2]


def pe_instruction(design: template.Design) -> str:
  if design.dataflow == "os":
    return ("Write the output-stationary multiply-accumulate processing element gemm_pe: it keeps one output "
            "accumulator acc, clears it on clr, adds a_in * b_in on en, and (when parameter FWD is 1) forwards "
            "a_in and b_in to its neighbours through registers, one hop per enabled cycle.")
  return ("Write the weight-stationary processing element gemm_pe: the weight w is held by the array, a_in passes "
          "to the right neighbour and psum_out = psum_in + a_in * w goes down the column; both are registered "
          "on en when parameter REG is 1 (systolic) and combinational when REG is 0.")


class BackendProposer:
  """The backend writes the candidates: JSON knobs ("config") or the PE module's code ("code")."""

  def __init__(self, backend: Any, space: Mapping[str, Sequence[Any]], workload: template.Workload, *,
               mode: str = "config", sampling: base.Sampling | None = None, area_weight: float = 1.0,
               selector: str = "llm", k_demos: int = 2, library: Sequence[demos_lib.Demo] | None = None):
    if mode not in MODES:
      raise ValueError(f"search.mode={mode!r} must be one of {MODES}")
    self.backend, self.space, self.workload, self.mode = backend, space, workload, mode
    self.sampling = sampling or base.Sampling(temperature=0.8, top_p=0.95, max_tokens=96)
    self.area_weight, self.selector, self.k_demos = area_weight, selector, k_demos
    self.library = list(library) if library is not None else demos_lib.load_library()
    self.heuristic = HeuristicProposer(space)
    self.name = f"backend:{mode}"

  def _sampling(self, seed: int, index: int, max_tokens: int | None = None) -> base.Sampling:
    return dataclasses.replace(self.sampling, n=1, seed=seed * 100003 + index,
                               max_tokens=max_tokens or self.sampling.max_tokens)

  def propose(self, parents, history, rng, index) -> Proposal:
    seed = int(rng.integers(1 << 30))
    if self.mode == "config":
      prompt = config_prompt(parents, history, self.space, self.workload, self.area_weight)
      text = self.backend.generate([prompt], self._sampling(seed, index))[0][0].text
      info = {"proposer": self.name, "answer": text[:300]}
      try:
        design, lenient = parse_design(text, template.Design.from_json(parents[0]["design"]))
        return Proposal(design, info={**info, "lenient_parse": lenient})
      except ValueError as e:
        return Proposal(None, info={**info, "error": str(e)})
    child = self.heuristic.propose(parents, history, rng, index).design
    instruction = pe_instruction(child)
    chosen, sel = demos_lib.select(self.selector, instruction, self.library, self.k_demos, backend=self.backend,
                                   seed=seed)
    prompt = demos_lib.build_prompt(instruction, chosen, interface=pe_interface(child))
    text = self.backend.generate([prompt], self._sampling(seed, index, max(self.sampling.max_tokens, 384)))[0][0].text
    return Proposal(child, {"gemm_pe": text}, {"proposer": self.name, "demos": sel, "answer": text[:300]})


def _record(i: int, source: str, proposal: Proposal | None, rec: Mapping[str, Any]) -> dict[str, Any]:
  keep = ("design", "ok", "stage", "category", "detail", "cycles", "analytic_cycles", "cells", "flip_flops",
          "depth", "fitness", "fixes", "hash", "cached")
  out = {"index": i, "source": source, **{k: rec.get(k) for k in keep}}
  if proposal is not None and proposal.info:
    out["proposal"] = proposal.info
  return out


def _unparseable(info: Mapping[str, Any]) -> dict[str, Any]:
  return {"design": None, "ok": False, "stage": "propose", "category": "unparseable",
          "detail": info.get("error", ""), "fitness": None}


def _tournament(pool: Sequence[Mapping[str, Any]], size: int, rng: np.random.Generator) -> Mapping[str, Any]:
  entrants = rng.choice(len(pool), size=min(size, len(pool)), replace=False)
  return max((pool[int(i)] for i in entrants), key=lambda r: (r["fitness"], -r["index"]))


def evolve(evaluator: Callable[..., Mapping[str, Any]], proposer: Any, config: SearchConfig,
           space: Mapping[str, Sequence[Any]], progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
  """The evolutionary search; returns one record per proposal (budget of them), in order."""
  rng = np.random.default_rng(config.seed)
  init_rng = np.random.default_rng([config.seed, 1])  # the initial population: the same as random search's start
  history: list[dict[str, Any]] = []
  for i in range(config.population):
    d = random_design(init_rng, space)
    history.append(_record(i, "init", None, evaluator(d)))
  while len(history) < config.budget:
    i = len(history)
    fit = sorted((r for r in history if r["ok"]), key=lambda r: (-r["fitness"], r["index"]))[:config.population]
    if len(fit) < 1:  # nothing fit yet: keep sampling at random (no parent to improve on)
      history.append(_record(i, "random", None, evaluator(random_design(init_rng, space))))
      continue
    parents = [_tournament(fit, config.tournament, rng), _tournament(fit, config.tournament, rng)]
    prop = proposer.propose(parents, history, rng, i)
    rec = evaluator(prop.design, prop.overrides or None) if prop.design is not None else _unparseable(prop.info)
    history.append(_record(i, "child", prop, rec))
    if progress:
      progress(f"{i + 1}/{config.budget}: {_fmt(history[-1]) if history[-1]['design'] else 'unparseable'}")
  return history


def random_search(evaluator: Callable[..., Mapping[str, Any]], config: SearchConfig,
                  space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """Uniform samples of the knob space, `config.budget` of them (the baseline)."""
  init_rng = np.random.default_rng([config.seed, 1])
  return [_record(i, "random", None, evaluator(random_design(init_rng, space))) for i in range(config.budget)]


def best_so_far(history: Sequence[Mapping[str, Any]]) -> list[float | None]:
  """The best fitness among the first i + 1 proposals (None until one is fit)."""
  out, best = [], None
  for r in history:
    if r.get("ok") and r.get("fitness") is not None and (best is None or r["fitness"] > best):
      best = r["fitness"]
    out.append(best)
  return out


def summarize(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Best fitness (fit designs only), the proposals needed to reach it, the best design, failure counts."""
  curve = best_so_far(history)
  fit = [r for r in history if r.get("ok")]
  best = max(fit, key=lambda r: (r["fitness"], -r["index"])) if fit else None
  cats: dict[str, int] = {}
  for r in history:
    if not r.get("ok"):
      cats[r.get("category") or "unknown"] = cats.get(r.get("category") or "unknown", 0) + 1
  return {"evaluations": len(history), "fit": len(fit), "best_fitness": best["fitness"] if best else None,
          "evals_to_best": (best["index"] + 1) if best else None, "best_design": best["design"] if best else None,
          "best_cycles": best["cycles"] if best else None, "best_cells": best["cells"] if best else None,
          "unique_designs": len({json.dumps(r["design"], sort_keys=True) for r in history if r.get("design")}),
          "failures": cats, "curve": curve}


def pareto(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """The fit designs no other fit design beats on both cycles and cells (fewer or equal on both, one fewer)."""
  fit = {json.dumps(r["design"], sort_keys=True): r for r in records if r.get("ok")}
  pts = list(fit.values())
  front = [p for p in pts if not any((q["cycles"] <= p["cycles"] and q["cells"] <= p["cells"]) and
                                     (q["cycles"] < p["cycles"] or q["cells"] < p["cells"]) for q in pts)]
  return sorted(front, key=lambda r: (r["cycles"], r["cells"]))


def scripted_designer(space: Mapping[str, Sequence[Any]], planted_errors: bool = True
                      ) -> Callable[[base.Prompt, int], str]:
  """The answer function of a scripted backend for the job and tests (no language model): for a config prompt,
  a JSON mutation of Parent 1 (deterministic in the prompt); for a demo-selection prompt, "1, 2"; for a PE
  prompt, the template's own PE with a planted error the auto-fixer knows (when `planted_errors`)."""
  import hashlib  # pylint: disable=g-import-not-at-top

  def answer(prompt: base.Prompt, j: int) -> str:
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    seed = int(hashlib.sha256(f"{text}\0{j}".encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    if "Which " in text and "examples are most similar" in text:
      return "1, 2"
    task = text[text.rfind("Instruction:"):]
    if "Write the " in task and "gemm_pe" in task:
      code = template.PE_OS if "output-stationary multiply" in task else template.PE_ST
      if planted_errors and rng.random() < 0.5:
        code = code.replace("endmodule", "")  # the auto-fixer appends it
      return f"Here is the module:\n```verilog\n{code}```\n"
    m = re.search(r"Parent 1: (\{[^}]*\})", text)
    if not m:
      return "I cannot tell."
    parent = template.Design.from_json(json.loads(m.group(1)))
    return json.dumps(mutate(parent, rng, space).to_json())

  return answer
