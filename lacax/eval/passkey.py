"""Synthetic passkey retrieval and needle-in-a-haystack (NIAH) prompts, fully offline.

The passkey task follows GATECH-EIC/LaCache ``niah/pred.py`` (``generate_prompt_landmark``, landmark-attention
style). A prompt is five lines joined by "\\n"::

  <task description>
  <first k characters of the filler>
  The pass key is X. Remember it. X is the pass key.
  <first n - k characters of the filler>
  What is the pass key? The pass key is

The filler is a fixed grass/sky/sun text repeated; X = ``random.Random(seed).randint(1, 99999)``. Note the
reference's quirk, kept by default (``suffix_mode="restart"``): the text after the needle restarts at the
beginning of the filler instead of continuing where the prefix stopped; ``suffix_mode="continue"`` gives the
contiguous haystack. The reference scores a greedy decode of ``len(tokenize(answer))`` tokens as correct when
it contains the answer string (`score_passkey`).

Depth is the fraction of the filler placed before the needle: measured in characters as the reference does
(``depth_unit="chars"``), or in tokens of a caller-supplied tokenizer (``depth_unit="tokens"``). Prompt length is
set in filler characters (the reference grid, `reference_filler_lengths`) or fitted to a token budget
(`fit_to_tokens`, `passkey_sample_for_tokens`).

`niah_sample` is the same construction with a caller-chosen haystack, needle, question and answer.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterator, Sequence

Tokenize = Callable[[str], Sequence[int]]
"""Text -> token ids. Whatever the callable adds (e.g. a BOS token) is counted, so pass the tokenizer the model
will see, or subtract constant overheads yourself."""

PASSKEY_TASK_DESCRIPTION = ("There is important information hidden in a lot of irrelevant text. "
                            "Find it and memorize it. You will be quizzed on this hidden information.")
PASSKEY_FILLER_UNIT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
                       "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
"""The reference's filler snippet (the five sentences twice); the filler is this string repeated."""
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_MIN, PASSKEY_MAX = 1, 99999

DEPTH_UNITS = ("chars", "tokens")
SUFFIX_MODES = ("restart", "continue")


@dataclasses.dataclass(frozen=True)
class NeedleSample:
  """One passkey / NIAH prompt and where its needle is.

  Attributes:
    prompt: the full text to feed the model.
    answer: the string a correct output must contain (the passkey digits for the passkey task).
    needle: the inserted sentence; ``prompt[needle_offset:needle_offset + len(needle)] == needle``.
    needle_offset: character index of the needle in ``prompt``.
    depth: the realised depth in ``depth_unit``: prefix characters / filler characters, or prefix tokens /
      filler tokens (see `niah_sample`); 0.0 when the filler is empty.
    depth_unit: "chars" or "tokens".
    prefix_chars: characters of filler before the needle (the reference's ``n_garbage_prefix``).
    filler_chars: characters of filler in total, before plus after the needle (the reference's ``n_garbage``).
    seed: the seed that drew the passkey, or None for a fixed needle.
    num_tokens: ``len(tokenize(prompt))`` when the sample was fitted to a token budget, else None.
  """

  prompt: str
  answer: str
  needle: str
  needle_offset: int
  depth: float
  depth_unit: str
  prefix_chars: int
  filler_chars: int
  seed: int | None = None
  num_tokens: int | None = None


def filler_text(num_chars: int, unit: str = PASSKEY_FILLER_UNIT) -> str:
  """The first ``num_chars`` characters of ``unit`` repeated (the reference slices ``unit * 5000``)."""
  if num_chars < 0:
    raise ValueError(f"filler_text: num_chars must be >= 0, got {num_chars}")
  if not unit:
    raise ValueError("filler_text: the haystack unit must be a non-empty string")
  return (unit * (num_chars // len(unit) + 1))[:num_chars]


def draw_passkey(seed: int) -> int:
  """The reference's passkey: ``random.Random(seed).randint(1, 99999)``; the global RNG is untouched."""
  return random.Random(seed).randint(PASSKEY_MIN, PASSKEY_MAX)


def passkey_needle(passkey: int | str) -> str:
  """The reference's information line for a passkey."""
  return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


def _token_count(tokenize: Tokenize, text: str, baseline: int) -> int:
  return len(tokenize(text)) - baseline


def _prefix_for_token_depth(filler: str, depth: float, tokenize: Tokenize) -> tuple[int, float]:
  """Largest k with tokens(filler[:k]) <= round(depth * tokens(filler)), and the realised token depth.

  Token counts exclude what ``tokenize("")`` returns (e.g. BOS). Binary search assumes the count grows with k,
  which holds for word- and BPE-level tokenizers up to rare one-token wobbles at merge boundaries.
  """
  baseline = len(tokenize(""))
  total = _token_count(tokenize, filler, baseline)
  if total <= 0:
    return 0, 0.0
  target = round(depth * total)
  low, high = 0, len(filler)  # invariant: count(low) <= target (count(0) = 0); answer in [low, high]
  while low < high:
    mid = (low + high + 1) // 2
    if _token_count(tokenize, filler[:mid], baseline) <= target:
      low = mid
    else:
      high = mid - 1
  return low, _token_count(tokenize, filler[:low], baseline) / total


def niah_sample(filler_chars: int, *, needle: str, answer: str, question: str, depth: float | None = None,
                prefix_chars: int | None = None, haystack: str = PASSKEY_FILLER_UNIT,
                task_description: str | None = None, suffix_mode: str = "continue", depth_unit: str = "chars",
                tokenize: Tokenize | None = None, separator: str = "\n", seed: int | None = None) -> NeedleSample:
  """Builds ``[task_description] + prefix + needle + suffix + question``, joined by ``separator``.

  Args:
    filler_chars: total haystack characters n (before plus after the needle).
    needle: the sentence to hide.
    answer: the string a correct output contains.
    question: the last line.
    depth: fraction in [0, 1] of the haystack before the needle, in ``depth_unit``. Exactly one of ``depth``
      and ``prefix_chars`` must be given. In "chars" the prefix is ``round(depth * n)`` characters.
    prefix_chars: the prefix length k in characters, 0 <= k <= n (the reference grid passes this).
    haystack: the text repeated to make the filler (default the passkey filler; e.g. a book or essays).
    task_description: an optional first line (omitted when None or empty).
    suffix_mode: "continue": the text after the needle is ``filler[k:n]`` (a contiguous haystack);
      "restart": it is ``filler[:n - k]`` as in LaCache's passkey code.
    depth_unit: "chars" or "tokens". In "tokens" (needs ``tokenize``), the prefix is the longest one whose
      token count is at most ``round(depth * T)``, T the token count of ``filler[:n]``, and the reported depth
      is prefix tokens / T (counts exclude ``tokenize("")``, e.g. BOS).
    tokenize: text -> token ids, for ``depth_unit="tokens"``.
    separator: joins the lines ("\\n" in the reference).
    seed: recorded in the result only.

  Raises:
    ValueError: a negative or non-integer length, depth outside [0, 1], both or neither of depth and
      prefix_chars, prefix_chars outside [0, filler_chars], an unknown mode, or tokens without a tokenizer.
  """
  if isinstance(filler_chars, bool) or not isinstance(filler_chars, int) or filler_chars < 0:
    raise ValueError(f"filler_chars must be a non-negative integer, got {filler_chars!r}")
  if (depth is None) == (prefix_chars is None):
    raise ValueError(f"give exactly one of depth and prefix_chars, got depth={depth!r}, "
                     f"prefix_chars={prefix_chars!r}")
  if depth is not None and not (isinstance(depth, (int, float)) and 0.0 <= depth <= 1.0):
    raise ValueError(f"depth must be a fraction in [0, 1], got {depth!r}")
  if depth_unit not in DEPTH_UNITS:
    raise ValueError(f"depth_unit must be one of {DEPTH_UNITS}, got {depth_unit!r}")
  if suffix_mode not in SUFFIX_MODES:
    raise ValueError(f"suffix_mode must be one of {SUFFIX_MODES}, got {suffix_mode!r}")
  if depth_unit == "tokens" and tokenize is None:
    raise ValueError("depth_unit='tokens' needs a tokenize callable (text -> token ids)")
  if depth_unit == "tokens" and prefix_chars is not None:
    raise ValueError("prefix_chars fixes the depth in characters; use depth=... with depth_unit='tokens'")

  filler = filler_text(filler_chars, haystack)
  if prefix_chars is not None:
    if isinstance(prefix_chars, bool) or not isinstance(prefix_chars, int) or not 0 <= prefix_chars <= filler_chars:
      raise ValueError(f"prefix_chars must be an integer in [0, filler_chars={filler_chars}], got {prefix_chars!r}")
    k = prefix_chars
    realised = k / filler_chars if filler_chars else 0.0
  elif depth_unit == "chars":
    k = round(depth * filler_chars)
    realised = k / filler_chars if filler_chars else 0.0
  else:
    k, realised = _prefix_for_token_depth(filler, depth, tokenize)

  prefix = filler[:k]
  suffix = filler[k:] if suffix_mode == "continue" else filler[:filler_chars - k]
  head = [task_description] if task_description else []
  lines = head + [prefix, needle, suffix, question]
  needle_offset = sum(len(line) + len(separator) for line in head + [prefix])
  return NeedleSample(prompt=separator.join(lines), answer=answer, needle=needle, needle_offset=needle_offset,
                      depth=realised, depth_unit=depth_unit, prefix_chars=k, filler_chars=filler_chars, seed=seed)


def passkey_sample(filler_chars: int, *, seed: int, depth: float | None = None, prefix_chars: int | None = None,
                   depth_unit: str = "chars", tokenize: Tokenize | None = None,
                   suffix_mode: str = "restart") -> NeedleSample:
  """LaCache's passkey prompt (``generate_prompt_landmark(n_garbage=filler_chars, n_garbage_prefix=k, seed)``).

  With ``prefix_chars=k`` and the default ``suffix_mode="restart"``, ``prompt`` and ``answer`` equal the
  reference's output character for character. Other arguments as in `niah_sample`.
  """
  passkey = draw_passkey(seed)
  return niah_sample(filler_chars, needle=passkey_needle(passkey), answer=str(passkey), question=PASSKEY_QUESTION,
                     depth=depth, prefix_chars=prefix_chars, haystack=PASSKEY_FILLER_UNIT,
                     task_description=PASSKEY_TASK_DESCRIPTION, suffix_mode=suffix_mode, depth_unit=depth_unit,
                     tokenize=tokenize, seed=seed)


def fit_to_tokens(make_sample: Callable[[int], NeedleSample], target_tokens: int,
                  tokenize: Tokenize) -> NeedleSample:
  """The sample with the most filler characters whose prompt has at most ``target_tokens`` tokens.

  Args:
    make_sample: filler characters -> sample (e.g. ``functools.partial(passkey_sample, seed=0, depth=0.5)``);
      depth must be given as a fraction so that it scales with the length.
    target_tokens: the budget for ``len(tokenize(prompt))``.
    tokenize: text -> token ids.

  Returns:
    The sample, with ``num_tokens`` set. Found by doubling then binary search over the filler length, which
    assumes the token count grows with it (true up to one-token wobbles at BPE merge boundaries); the returned
    prompt is always within budget.

  Raises:
    ValueError: even the prompt without filler exceeds ``target_tokens``.
  """

  def count(n: int) -> tuple[int, NeedleSample]:
    sample = make_sample(n)
    return len(tokenize(sample.prompt)), sample

  tokens, best = count(0)
  if tokens > target_tokens:
    raise ValueError(f"target_tokens={target_tokens} is below the {tokens} tokens of the prompt without filler")
  low, high = 0, 1  # count(low) <= target; find high with count(high) > target
  while True:
    tokens, sample = count(high)
    if tokens > target_tokens:
      break
    low, best = high, sample
    high *= 2
  while high - low > 1:
    mid = (low + high) // 2
    tokens, sample = count(mid)
    if tokens <= target_tokens:
      low, best = mid, sample
    else:
      high = mid
  return dataclasses.replace(best, num_tokens=len(tokenize(best.prompt)))


def passkey_sample_for_tokens(target_tokens: int, tokenize: Tokenize, *, seed: int, depth: float,
                              depth_unit: str = "chars", suffix_mode: str = "restart") -> NeedleSample:
  """The longest passkey prompt within ``target_tokens`` tokens, needle at ``depth`` (see `fit_to_tokens`)."""
  return fit_to_tokens(
      lambda n: passkey_sample(n, seed=seed, depth=depth, depth_unit=depth_unit,
                               tokenize=tokenize if depth_unit == "tokens" else None, suffix_mode=suffix_mode),
      target_tokens, tokenize)


def reference_filler_lengths(max_tokens: int = 4096, interval: int = 2948) -> list[int]:
  """The reference's filler lengths n, one per point: ``int(3.75 * (point + 1) * interval // 1024 * 1024)``.

  ``point`` runs over ``range(max_tokens // interval)``; the defaults are ``niah/pred.py``'s (one point,
  10240 characters). The 3.75 characters per token is the reference's rough estimate; the actual token count
  depends on the tokenizer.
  """
  if interval <= 0 or max_tokens <= 0:
    raise ValueError(f"max_tokens and interval must be positive, got max_tokens={max_tokens}, interval={interval}")
  return [int(3.75 * (point + 1) * interval // 1024 * 1024) for point in range(max_tokens // interval)]


def reference_prefix_grid(filler_chars: int) -> list[int]:
  """The reference's needle positions for a filler of n characters: ``range(0, n + 1, max(n // 10, 1))``.

  Usually 11 positions, depth 0 to about 1 in steps of ``n // 10`` characters (the last one below n when n is not
  a multiple of 10). The reference labels a depth as ``round(100 * k / n, -1)``.
  """
  return list(range(0, filler_chars + 1, max(filler_chars // 10, 1)))


def reference_passkey_grid(max_tokens: int = 4096, interval: int = 2948,
                           num_tests: int = 5) -> Iterator[NeedleSample]:
  """Every sample of the reference sweep, in its order: lengths x needle positions x seeds 0..num_tests-1."""
  for filler_chars in reference_filler_lengths(max_tokens, interval):
    for prefix_chars in reference_prefix_grid(filler_chars):
      for seed in range(num_tests):
        yield passkey_sample(filler_chars, seed=seed, prefix_chars=prefix_chars)


def token_passkey_grid(target_tokens: Sequence[int], depths: Sequence[float], seeds: Sequence[int],
                       tokenize: Tokenize, *, depth_unit: str = "chars",
                       suffix_mode: str = "restart") -> Iterator[NeedleSample]:
  """Passkey samples fitted to token budgets: lengths x depths x seeds (see `passkey_sample_for_tokens`)."""
  for target in target_tokens:
    for depth in depths:
      for seed in seeds:
        yield passkey_sample_for_tokens(target, tokenize, seed=seed, depth=depth, depth_unit=depth_unit,
                                        suffix_mode=suffix_mode)


def depth_grid(num_depths: int = 11) -> list[float]:
  """Evenly spaced depths 0, 1/(num_depths-1), ..., 1 (default 0, 0.1, ..., 1.0)."""
  if num_depths < 2:
    raise ValueError(f"num_depths must be >= 2, got {num_depths}")
  return [i / (num_depths - 1) for i in range(num_depths)]


def score_passkey(output_text: str, answer: str) -> bool:
  """The reference's check: the gold string occurs in the output.

  A substring test, as in the reference: "12345" counts as containing the passkey "1234" too.
  """
  return answer in output_text


def pass_rate(outputs: Sequence[str], answers: Sequence[str]) -> float:
  """Fraction of outputs that `score_passkey` accepts; NaN for no outputs."""
  if len(outputs) != len(answers):
    raise ValueError(f"pass_rate: {len(outputs)} outputs but {len(answers)} answers")
  if not outputs:
    return math.nan
  return sum(score_passkey(o, a) for o, a in zip(outputs, answers)) / len(outputs)
