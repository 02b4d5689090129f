"""Text normalisation and character vocabularies for CTC.

Normalisation (applied to every transcript and to every reference before scoring): Unicode NFC, lower case,
every character that is not a letter becomes a space (digits are refused: spell numbers out, e.g. with
`num2words`), runs of spaces collapse to one. So "L'été, 2 fois!" is refused and "L'été — deux fois!" becomes
"l été deux fois".
"""

from __future__ import annotations

import dataclasses
import unicodedata

BLANK = "<blank>"
SPACE = " "


def normalize_text(text: str, source: str = "text") -> str:
  """The normalisation above. Raises ValueError on digits (they have no spoken form here)."""
  text = unicodedata.normalize("NFC", text).lower()
  digits = sorted({c for c in text if c.isdigit()})
  if digits:
    raise ValueError(f"{source}: {text!r} contains digits {digits}; spell numbers out (e.g. num2words)")
  chars = [c if c.isalpha() else " " for c in text]
  return " ".join("".join(chars).split())


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Characters of a CTC output layer: id 0 is the blank, id 1 the space, then letters in order of arrival.

  Attributes:
    chars: the letters, ids 2.. (a tuple, so a vocabulary is hashable and ids never move).
  """
  chars: tuple[str, ...] = ()

  def __post_init__(self):
    if len(set(self.chars)) != len(self.chars):
      raise ValueError(f"Vocabulary.chars has duplicates: {self.chars}")
    bad = [c for c in self.chars if len(c) != 1 or c == SPACE]
    if bad:
      raise ValueError(f"Vocabulary.chars must be single non-space characters, got {bad}")

  @classmethod
  def from_texts(cls, texts) -> "Vocabulary":
    return cls().extend(texts)

  def extend(self, texts) -> "Vocabulary":
    """A vocabulary with the new letters of `texts` appended; existing ids are unchanged."""
    seen = set(self.chars)
    new = []
    for text in texts:
      for c in text:
        if c != SPACE and c not in seen:
          seen.add(c)
          new.append(c)
    return Vocabulary(self.chars + tuple(sorted(new)))

  @property
  def size(self) -> int:
    return 2 + len(self.chars)

  @property
  def tokens(self) -> tuple[str, ...]:
    return (BLANK, SPACE) + self.chars

  def encode(self, text: str, source: str = "text") -> list[int]:
    """Ids of a normalised text; raises ValueError naming the characters outside the vocabulary."""
    index = {c: i for i, c in enumerate(self.tokens)}
    missing = sorted({c for c in text if c not in index or c == BLANK})
    if missing:
      raise ValueError(f"{source}: characters {missing} of {text!r} are not in the vocabulary "
                       f"({self.size} tokens); extend it with Vocabulary.extend([...]) first")
    return [index[c] for c in text]

  def decode(self, ids) -> str:
    """Ids (no blanks, already collapsed) to text; ids out of range raise."""
    tokens = self.tokens
    out = []
    for i in ids:
      i = int(i)
      if not 0 < i < len(tokens):
        raise ValueError(f"decode: id {i} outside 1..{len(tokens) - 1}")
      out.append(tokens[i])
    return "".join(out)
