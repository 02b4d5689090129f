"""The word lists and text RULER's generators draw from, offline.

RULER draws NIAH keys as "adjective-noun" pairs and common-words lists from the `wonderwords` package, and its
essay haystack from Paul Graham's essays (downloaded). lacax uses what is installed instead:

  `english_words()`   lowercase alphabetic English words of 3-12 letters from `wordfreq`'s English list, most
                      frequent first, the ~200 most frequent (function words) skipped; the list is a pure function
                      of the installed wordfreq data;
  `essay_words(text)` the haystack text split on whitespace (RULER: ``re.sub(r"\\s+", " ", essay).split(" ")``);
                      the text defaults to `lacax.eval.texts.default_text()` (prose shipped with Python);
  `split_sentences`   a regex sentence splitter (RULER uses nltk's punkt `sent_tokenize`, not installed here):
                      a sentence ends at ".", "!" or "?" followed by whitespace.
"""

from __future__ import annotations

import functools
import re

_SKIP_MOST_FREQUENT = 200
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@functools.lru_cache(maxsize=4)
def english_words(count: int = 20000) -> tuple[str, ...]:
  """`count` distinct English words (see the module docstring), most frequent first."""
  import wordfreq  # pylint: disable=g-import-not-at-top

  words = []
  for w in wordfreq.top_n_list("en", count * 3 + _SKIP_MOST_FREQUENT)[_SKIP_MOST_FREQUENT:]:
    if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 12:
      words.append(w)
      if len(words) == count:
        break
  if len(words) < count:
    raise ValueError(f"wordfreq's English list has only {len(words)} usable words, {count} were asked for")
  return tuple(words)


def essay_words(text: str) -> list[str]:
  """RULER's essay haystack unit: the text with whitespace squeezed, split on spaces."""
  return re.sub(r"\s+", " ", text).strip().split(" ")


def split_sentences(text: str) -> list[str]:
  """Sentences of `text` (see the module docstring); no empty strings."""
  return [s for s in _SENTENCE_END.split(text.strip()) if s]
