"""GPT4AIGChip's demo-augmented prompt generator (§III-B): a library of (instruction, module code) demos and the
selectors that choose which demos go into a prompt.

The library ships as package data (`data/demos.json`: PE, interconnect, buffer and controller modules written for
this template, plus one deliberately unrelated module); `load_library(path)` reads a user's own file of the same
form (`{"demos": [{"id", "module", "instruction", "code"}, ...]}`).

Selectors (`select(mode, instruction, library, k, ...)` -> demos, most relevant first):

  llm         the paper's: the backend is shown the numbered demo instructions and asked for the k most similar
              to the design instruction (LLM-as-retriever, not embeddings); numbers it gives outside the library
              or repeated are dropped, and a short answer is filled up in bm25 order (recorded as "fallback")
  embedding   cosine similarity of backend embeddings (`backend.embed`, e.g. the local model's mean-pooled
              hidden states; needs the "embeddings" capability)
  bm25        Okapi BM25 (k1 = 1.5, b = 0.75) of the instruction against each demo's instruction
  random      k demos drawn with `seed`
  dissimilar  the k lowest BM25 scores (the paper's dissimilar-demo ablation)
  none        no demos

`build_prompt(instruction, demos, ...)` writes the chat prompt: the demos as instruction / code pairs, then the
task.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import re
from typing import Any, Sequence

import numpy as np

from lacax.hw.backends import base

SELECTORS = ("llm", "embedding", "bm25", "random", "dissimilar", "none")
_TOKEN_RE = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the of to and or in on for is it its by with that this one two from as be at so".split())


@dataclasses.dataclass(frozen=True)
class Demo:
  id: str
  module: str
  instruction: str
  code: str


def load_library(path: str | None = None) -> list[Demo]:
  """The shipped demo library (path None) or a user's JSON file of the same form; bad entries are named."""
  if path is None:
    text = importlib.resources.files("lacax.hw.aigchip").joinpath("data/demos.json").read_text(encoding="utf-8")
    where = "lacax/hw/aigchip/data/demos.json"
  else:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    where = path
  try:
    doc = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
  items = doc.get("demos") if isinstance(doc, dict) else None
  if not isinstance(items, list) or not items:
    raise ValueError(f"{where}: expected {{'demos': [{{'id', 'module', 'instruction', 'code'}}, ...]}}")
  out, seen = [], set()
  for i, d in enumerate(items):
    missing = [k for k in ("id", "module", "instruction", "code") if not isinstance(d, dict) or
               not isinstance(d.get(k), str) or not d.get(k).strip()]
    if missing:
      raise ValueError(f"{where}: demos[{i}] lacks non-empty string field(s) {missing}")
    if d["id"] in seen:
      raise ValueError(f"{where}: demos[{i}].id={d['id']!r} is repeated")
    seen.add(d["id"])
    out.append(Demo(d["id"], d["module"], d["instruction"], d["code"]))
  return out


def tokens(text: str) -> list[str]:
  return [t for t in _TOKEN_RE.findall(text.lower()) if t not in _STOP]


def bm25_scores(query: str, docs: Sequence[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
  """Okapi BM25 of `query` against each document (idf with the +1 smoothing of Lucene, never negative)."""
  toks = [tokens(d) for d in docs]
  n = len(toks)
  avg = sum(len(t) for t in toks) / max(n, 1)
  df: dict[str, int] = {}
  for t in toks:
    for w in set(t):
      df[w] = df.get(w, 0) + 1
  scores = np.zeros(n)
  for w in set(tokens(query)):
    if w not in df:
      continue
    idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
    for i, t in enumerate(toks):
      f = t.count(w)
      if f:
        scores[i] += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(t) / max(avg, 1e-9)))
  return scores


def _order(scores: np.ndarray, descending: bool = True) -> list[int]:
  # stable: ties keep library order
  idx = list(range(len(scores)))
  return sorted(idx, key=lambda i: (-scores[i] if descending else scores[i], i))


def llm_prompt(instruction: str, library: Sequence[Demo], k: int) -> list[dict[str, str]]:
  listing = "\n".join(f"{i + 1}. {d.instruction}" for i, d in enumerate(library))
  return [{"role": "system", "content": "You choose reference examples for a hardware designer."},
          {"role": "user", "content": f"Design instruction:\n{instruction}\n\nExamples:\n{listing}\n\n"
                                      f"Which {k} examples are most similar to the design instruction? Answer with "
                                      f"their numbers only, most similar first, separated by commas."}]


def parse_choice(text: str, size: int, k: int) -> list[int]:
  """The distinct 0-based indices among the first numbers in `text` that name a demo (1-based in the text)."""
  out = []
  for m in re.findall(r"\d+", text):
    i = int(m) - 1
    if 0 <= i < size and i not in out:
      out.append(i)
    if len(out) == k:
      break
  return out


def select(mode: str, instruction: str, library: Sequence[Demo], k: int = 2, *, backend: Any = None,
           sampling: base.Sampling | None = None, seed: int = 0) -> tuple[list[Demo], dict[str, Any]]:
  """(the k chosen demos, a record of how they were chosen)."""
  if mode not in SELECTORS:
    raise ValueError(f"selector={mode!r} must be one of {SELECTORS}")
  if not isinstance(k, int) or k < 0:
    raise ValueError(f"k={k!r} must be an integer >= 0")
  k = min(k, len(library))
  info: dict[str, Any] = {"selector": mode, "k": k}
  if mode == "none" or k == 0:
    return [], info
  docs = [d.instruction for d in library]
  if mode == "random":
    idx = list(np.random.default_rng(seed).choice(len(library), size=k, replace=False))
  elif mode in ("bm25", "dissimilar"):
    scores = bm25_scores(instruction, docs)
    idx = _order(scores, descending=mode == "bm25")[:k]
    info["scores"] = [round(float(scores[i]), 4) for i in idx]
  elif mode == "embedding":
    if backend is None:
      raise ValueError("selector='embedding' needs a backend with the 'embeddings' capability")
    base.require(backend, "embeddings")
    vecs = np.asarray(backend.embed([instruction] + docs), dtype=np.float64)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    sims = vecs[1:] @ vecs[0]
    idx = _order(sims)[:k]
    info["scores"] = [round(float(sims[i]), 4) for i in idx]
  else:  # llm
    if backend is None:
      raise ValueError("selector='llm' needs a backend")
    sampling = sampling or base.Sampling(max_tokens=24, temperature=0.0, seed=seed)
    text = backend.generate([llm_prompt(instruction, library, k)], sampling)[0][0].text
    idx = parse_choice(text, len(library), k)
    info["answer"] = text[:200]
    if len(idx) < k:
      fill = [i for i in _order(bm25_scores(instruction, docs)) if i not in idx]
      info["fallback"] = k - len(idx)
      idx += fill[:k - len(idx)]
  info["ids"] = [library[i].id for i in idx]
  return [library[i] for i in idx], info


def build_prompt(instruction: str, demos: Sequence[Demo], *, interface: str = "",
                 system: str = "You are an expert hardware designer. Answer with synthesizable Verilog-2005 only."
                 ) -> list[dict[str, str]]:
  """The demo-augmented chat prompt: each demo as `Instruction:` / `Code:`, then the task and its interface."""
  parts = []
  for i, d in enumerate(demos, 1):
    parts.append(f"Example {i}.\nInstruction: {d.instruction}\nCode:\n```verilog\n{d.code.strip()}\n```")
  task = f"Instruction: {instruction}"
  if interface:
    task += f"\nUse exactly this interface:\n```verilog\n{interface.strip()}\n```"
  parts.append(task + "\nCode:")
  return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]
