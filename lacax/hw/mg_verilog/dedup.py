"""MinHash-LSH near-duplicate removal (MG-Verilog's preprocessing: Jaccard 0.85, 256 permutations).

Documents are shingled into word tokens (identifiers, numbers, operators); snippets under `min_tokens` tokens
are kept unhashed (the Starting Toolkit's `minhash.py` skips those under 10). A document is dropped when the
LSH index already holds one whose estimated Jaccard similarity reaches `threshold`; the first of each group is
kept, so the result is deterministic for a given order and seed. Uses `datasketch` (MinHash, MinHashLSH).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
_TOKEN_RE = re.compile(r"[A-Za-z_]\w*|\d+|\S")


def tokens(text: str) -> list[str]:
  return _TOKEN_RE.findall(text)


def minhash(text: str, num_perm: int = 256, seed: int = 1):
  from datasketch import MinHash  # pylint: disable=g-import-not-at-top
  m = MinHash(num_perm=num_perm, seed=seed)
  for tok in set(tokens(text)):
    m.update(tok.encode())
  return m


def dedup(items: Sequence[T], key: Callable[[T], str] = lambda x: x, threshold: float = 0.85,
          num_perm: int = 256, min_tokens: int = 10, seed: int = 1) -> tuple[list[T], list[tuple[int, int]]]:
  """(kept items, [(dropped index, index of the kept near-duplicate)])."""
  from datasketch import MinHashLSH  # pylint: disable=g-import-not-at-top
  if not 0 < threshold <= 1:
    raise ValueError(f"threshold={threshold!r} must be in (0, 1]")
  lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
  kept, dropped = [], []
  for i, item in enumerate(items):
    text = key(item)
    if len(tokens(text)) < min_tokens:
      kept.append(item)
      continue
    m = minhash(text, num_perm, seed)
    hits = lsh.query(m)
    if hits:
      dropped.append((i, min(int(h) for h in hits)))
      continue
    lsh.insert(str(i), m)
    kept.append(item)
  return kept, dropped
