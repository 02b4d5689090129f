"""RULER's synthetic tasks (NVIDIA/RULER `scripts/synthetic.yaml`, `scripts/data/synthetic/*.py`), offline.

The 13 tasks of RULER's default suite, with the official templates, answer prefixes, decode lengths and metrics
(`scripts/data/synthetic/constants.py`, `scripts/eval/synthetic/constants.py`):

  niah_single_1/2/3     one needle "One of the special magic {numbers|uuids} for {key} is: {value}." in the
                        noise (grass/sky/sun) or essay haystack;
  niah_multikey_1/2/3   several needles of different keys (multikey_1), or a haystack made only of distractor
                        needles (multikey_2: word keys, number values; multikey_3: uuid keys and values);
  niah_multivalue       one key with 4 values, all asked for;
  niah_multiquery       4 keys asked for at once;
  vt                    variable tracking: a chain "VAR A = 12345, VAR B = VAR A, ..." hidden in noise, with one
                        in-context example; the answer is every variable of the chain;
  cwe                   common words extraction: a numbered word list in which 10 words appear 30x (6x below
                        4k tokens) and the rest 3x (1x); with one solved example;
  fwe                   frequent words extraction: coded 6-letter words drawn from a Zipf (zeta, alpha 2)
                        distribution; the answer is the 3 most frequent after the "..." noise word;
  qa_1, qa_2            QA on given passages. RULER reads SQuAD / HotpotQA (downloads); here the passages are
                        generated: qa_1 (single hop, SQuAD-like) asks for one attribute of one named person among
                        distractor documents about other people; qa_2 (two hops, HotpotQA-like) needs the town a
                        person was born in (one document) and what that town is known for (another).

Lengths are in the model's tokens: each prompt (the model's rendering of input + answer prefix) plus the task's
`tokens_to_generate` fits in the length, with the largest haystack that does (RULER's binary search over the
haystack size, once per task and length; a sample that comes out longer drops `incremental` haystack units, as
RULER does).

Determinism: every sample is a pure function of (seed, task, length, index) through its own `random.Random`;
the global RNGs are never used (RULER seeds the global ones; lacax's samples are therefore RULER-shaped, not
RULER's strings). Differences from RULER, all because its sources must be downloaded: keys and common words
come from `wordfreq` instead of `wonderwords` (keys are "word-word" pairs without the adjective/noun split); the
essay haystack is `lacax.eval.texts.default_text()` (or the user's text) instead of Paul Graham's essays, split
into sentences by a regex instead of nltk; QA passages are generated (see above).
"""

from __future__ import annotations

import dataclasses
import random
import string
import uuid
from typing import Callable, Sequence

import numpy as np

from lacax.eval.ruler import words as ruler_words

Render = Callable[[str, str], Sequence[int]]
"""(input text, answer prefix) -> the token ids the model sees (chat wrapping included)."""

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]
DOCUMENT_PROMPT = "Document {i}:\n{document}"

TEMPLATES = {
    "niah": dict(
        tokens_to_generate=128, metric="string_match_all",
        template=("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                  "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                  "magic {type_needle_v} for {query} mentioned in the provided text?"),
        answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": dict(
        tokens_to_generate=30, metric="string_match_all",
        template=("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                  "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."),
        answer_prefix=(" Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                       "variables are assigned the value {query}, they are: ")),
    "common_words_extraction": dict(
        tokens_to_generate=120, metric="string_match_all",
        template=("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                  "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                  "above list?"),
        answer_prefix=" Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": dict(
        tokens_to_generate=50, metric="string_match_all",
        template=("Read the following coded text and track the frequency of each coded word. Find the three most "
                  "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                  "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                  "text?"),
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:"),
    "qa": dict(
        tokens_to_generate=32, metric="string_match_part",
        template=("Answer the question based on the given documents. Only give me the answer and do not output any "
                  "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
                  "the given documents. Only give me the answer and do not output any other words.\n\nQuestion: "
                  "{query}"),
        answer_prefix=" Answer:"),
}
"""RULER's task templates (`scripts/data/synthetic/constants.py`) and metrics (`scripts/eval/synthetic/`)."""


def _niah(haystack, k, v, q, type_k="words", type_v="numbers"):
  return ("niah", dict(type_haystack=haystack, type_needle_k=type_k, type_needle_v=type_v, num_needle_k=k,
                       num_needle_v=v, num_needle_q=q))


TASKS: dict[str, tuple[str, dict]] = {
    "niah_single_1": _niah("noise", 1, 1, 1),
    "niah_single_2": _niah("essay", 1, 1, 1),
    "niah_single_3": _niah("essay", 1, 1, 1, type_v="uuids"),
    "niah_multikey_1": _niah("essay", 4, 1, 1),
    "niah_multikey_2": _niah("needle", 1, 1, 1),
    "niah_multikey_3": _niah("needle", 1, 1, 1, type_k="uuids", type_v="uuids"),
    "niah_multivalue": _niah("essay", 1, 4, 1),
    "niah_multiquery": _niah("essay", 1, 1, 4),
    "vt": ("variable_tracking", dict(type_haystack="noise", num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": ("qa", dict(hops=1)),
    "qa_2": ("qa", dict(hops=2)),
}
"""RULER's default suite (`scripts/synthetic.yaml`): name -> (template family, arguments)."""


def tokens_to_generate(task: str) -> int:
  return TEMPLATES[TASKS[task][0]]["tokens_to_generate"]


def metric_of(task: str) -> str:
  return TEMPLATES[TASKS[task][0]]["metric"]


@dataclasses.dataclass(frozen=True)
class RulerSample:
  """One RULER prompt.

  Attributes:
    task, length, index: which sample (the length is the token budget: prompt + tokens_to_generate).
    input: the text before the answer prefix (RULER's "input").
    answer_prefix: appended after the input (after the chat wrapping, as RULER's model templates do).
    outputs: the gold strings (RULER's "outputs").
    ids: the token ids fed to the model.
    new_tokens: the tokens to decode (RULER's tokens_to_generate).
    haystack_size: the haystack units used (sentences, words, documents).
  """

  task: str
  length: int
  index: int
  input: str
  answer_prefix: str
  outputs: tuple[str, ...]
  ids: tuple[int, ...]
  new_tokens: int
  haystack_size: int


# --- generators: (haystack size, rng) -> (input, answer prefix, outputs) ---------------------------------------


def _random_value(kind: str, rng: random.Random, vocab: Sequence[str]) -> str:
  if kind == "numbers":
    return str(rng.randint(10 ** 6, 10 ** 7 - 1))
  if kind == "words":
    return f"{rng.choice(vocab)}-{rng.choice(vocab)}"
  if kind == "uuids":
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
  raise ValueError(f"needle type {kind!r} must be 'numbers', 'words' or 'uuids'")


def _essay_text(essay: Sequence[str], n: int) -> str:
  repeats = -(-n // len(essay))
  return " ".join((list(essay) * repeats)[:n])


def _insert_at_depths(sentences: list[str], inserts: Sequence[str], rng: random.Random) -> str:
  """RULER's essay insertion: each insert after int(len(sentences) * depth / 100) sentences, depths drawn from
  `DEPTHS` without replacement."""
  positions = [0] + sorted(int(len(sentences) * (d / 100)) for d in rng.sample(DEPTHS, len(inserts))) + [len(sentences)]
  parts = []
  for i in range(1, len(positions)):
    parts.append(" ".join(sentences[positions[i - 1]:positions[i]]))
    if i - 1 < len(inserts):
      parts.append(inserts[i - 1])
  return " ".join(parts)


def _niah_generate(args: dict, n: int, rng: random.Random, seed: int, essay: Sequence[str]):
  vocab = ruler_words.english_words()
  type_k, type_v = args["type_needle_k"], args["type_needle_v"]
  num_q, num_v = args["num_needle_q"], args["num_needle_v"]
  num_k = max(args["num_needle_k"], num_q)
  keys, values, needles = [], [], []
  for _ in range(num_k):
    keys.append(_random_value(type_k, rng, vocab))
    value = []
    for _ in range(num_v):
      value.append(_random_value(type_v, rng, vocab))
      needles.append(NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=value[-1]))
    values.append(value)
  random.Random(seed).shuffle(needles)
  haystack = args["type_haystack"]
  if haystack == "essay":
    context = _insert_at_depths(ruler_words.split_sentences(_essay_text(essay, n)), needles, rng)
  else:
    if haystack == "noise":
      sentences = [NOISE] * n
    else:  # "needle": distractor needles with random keys and values
      sentences = [NEEDLE.format(type_needle_v=type_v, key=_random_value(type_k, rng, vocab),
                                 value=_random_value(type_v, rng, vocab)) for _ in range(n)]
    for index, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
      sentences.insert(index, needle)
    context = "\n".join(sentences)
  indices = rng.sample(range(num_k), num_q)
  queries = [keys[i] for i in indices]
  answers = [a for i in indices for a in values[i]]
  query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
  template, prefix = TEMPLATES["niah"]["template"], TEMPLATES["niah"]["answer_prefix"]
  type_shown = type_v
  if num_q * num_v == 1:  # RULER's singular rewording, applied to template + answer prefix alike
    def singular(s):
      return s.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
    template, prefix, type_shown = singular(template), singular(prefix), type_v[:-1]
  return (template.format(type_needle_v=type_shown, context=context, query=query),
          prefix.format(type_needle_v=type_shown, query=query), answers)


def _vt_chain(rng: random.Random, num_hops: int, icl: bool):
  k = 3 if icl else 5
  names: list[str] = []
  while len(names) < num_hops + 1:
    name = "".join(rng.choices(string.ascii_uppercase, k=k))
    if name not in names:
      names.append(name)
  value = "12345" if icl else str(rng.randint(10000, 99998))
  chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
  return names, chain, value


def _vt_generate(args: dict, n: int, rng: random.Random, icl: bool = False):
  """One chain (RULER's default num_chains=1) in the noise haystack."""
  num_hops = args["num_hops"]
  names, chain, value = _vt_chain(rng, num_hops, icl)
  sentences = [NOISE] * n
  positions = sorted(rng.sample(range(len(sentences)), len(chain)))
  for j, (position, link) in enumerate(zip(positions, chain)):
    sentences.insert(position + j, link)
  context = "\n".join(sentences).replace(". \n", ".\n")
  spec = TEMPLATES["variable_tracking"]
  return (spec["template"].format(context=context, query=value),
          spec["answer_prefix"].format(num_v=num_hops + 1, query=value), names)


def _vt_randomize_icl(example: str, num_hops: int, rng: random.Random) -> str:
  """RULER's `randomize_icl`: fresh names for the example's answer variables, a fresh value for 12345."""
  for item in example.strip().split()[-num_hops - 1:]:
    example = example.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
  return example.replace("12345", str(rng.randint(10000, 99998)))


def _cwe_example(vocab: Sequence[str], large: Sequence[str], num_words: int, common_repeats: int,
                 uncommon_repeats: int, common_nums: int, rng: random.Random, seed: int):
  pool = vocab if num_words <= len(vocab) else large
  word_list_full = rng.sample(list(pool), num_words)
  common, uncommon = word_list_full[:common_nums], word_list_full[common_nums:]
  word_list = common * int(common_repeats) + uncommon * int(uncommon_repeats)
  random.Random(seed).shuffle(word_list)
  return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), common


def _cwe_vocab(seed: int) -> tuple[list[str], tuple[str, ...]]:
  vocab = list(ruler_words.english_words(4000))  # RULER: wonderwords nouns + adjectives + verbs, shuffled
  vocab.sort()
  random.Random(seed).shuffle(vocab)
  return vocab, ruler_words.english_words(30000)


def _cwe_generate(args: dict, n: int, rng: random.Random, seed: int, length: int):
  vocab, large = _cwe_vocab(seed)
  spec = TEMPLATES["common_words_extraction"]
  num_cw = args["num_cw"]
  if length < 4096:
    shot = _cwe_example(vocab, large, 20, 3, 1, num_cw, rng, seed)
    context, answer = _cwe_example(vocab, large, n, 6, 1, num_cw, rng, seed)
  else:
    shot = _cwe_example(vocab, large, 40, 10, 3, num_cw, rng, seed)
    context, answer = _cwe_example(vocab, large, n, args["freq_cw"], args["freq_ucw"], num_cw, rng, seed)
  shot_text = (spec["template"].format(context=shot[0]) + spec["answer_prefix"] + " " +
               " ".join(f"{i + 1}. {w}" for i, w in enumerate(shot[1])))
  return shot_text + "\n" + spec["template"].format(context=context), spec["answer_prefix"], answer


def _fwe_vocab(rng: random.Random, seed: int, vocab_size: int, wordlen: int = 6) -> list[str]:
  vocab = ["".join(rng.choices(string.ascii_lowercase, k=wordlen)) for _ in range(vocab_size)]
  while len(set(vocab)) < vocab_size:
    vocab.append("".join(rng.choices(string.ascii_lowercase, k=wordlen)))
  vocab = sorted(set(vocab))
  random.Random(seed).shuffle(vocab)
  vocab[0] = "..."  # RULER: the top-ranked word is noise
  return vocab


def _fwe_generate(args: dict, n: int, rng: random.Random, seed: int, length: int):
  from scipy.special import zeta  # pylint: disable=g-import-not-at-top

  alpha = args["alpha"]
  vocab = _fwe_vocab(rng, seed, max(4, (length - tokens_to_generate("fwe")) // 50))
  ranks = np.arange(1, len(vocab) + 1)
  counts = (n * (ranks ** -alpha) / zeta(alpha)).astype(int)
  sampled = [w for w, c in zip(vocab, counts) for _ in range(c)]
  random.Random(seed).shuffle(sampled)
  spec = TEMPLATES["freq_words_extraction"]
  return spec["template"].format(context=" ".join(sampled)), spec["answer_prefix"], vocab[1:4]


_QA_ATTRIBUTES = ("favourite colour", "profession", "home town", "favourite fruit", "pet's name", "hobby",
                  "favourite instrument", "lucky word")


def _person(rng: random.Random, vocab: Sequence[str]) -> str:
  return f"{rng.choice(vocab).capitalize()} {rng.choice(vocab).capitalize()}"


def _prose(rng: random.Random, sentences: Sequence[str], count: int = 2) -> str:
  start = rng.randrange(max(1, len(sentences) - count))
  return " ".join(sentences[start:start + count])


def _qa_generate(args: dict, n: int, rng: random.Random, seed: int, sentences: Sequence[str]):
  """Generated passages (see the module docstring): n documents, the gold one(s) among distractors."""
  vocab = ruler_words.english_words()
  n = max(n, args["hops"])
  if args["hops"] == 1:
    name, attribute, value = _person(rng, vocab), rng.choice(_QA_ATTRIBUTES), rng.choice(vocab)
    gold = [f"{name}\n{_prose(rng, sentences)} The {attribute} of {name} is {value}."]
    question = f"What is the {attribute} of {name}?"
  else:
    name, town, value = _person(rng, vocab), rng.choice(vocab).capitalize() + "ton", rng.choice(vocab)
    gold = [f"{name}\n{_prose(rng, sentences)} {name} was born in the town of {town}.",
            f"{town}\n{_prose(rng, sentences)} The town of {town} is known for its {value}."]
    question = f"What is the town where {name} was born known for?"
  docs = list(gold)
  while len(docs) < n:
    other = _person(rng, vocab)
    if rng.random() < 0.5:
      fact = f"The {rng.choice(_QA_ATTRIBUTES)} of {other} is {rng.choice(vocab)}."
    else:
      other_town = rng.choice(vocab).capitalize() + "ton"
      fact = (f"{other} was born in the town of {other_town}." if rng.random() < 0.5 else
              f"The town of {other_town} is known for its {rng.choice(vocab)}.")
      other = other if "born" in fact else other_town
    docs.append(f"{other}\n{_prose(rng, sentences)} {fact}")
  random.Random(seed).shuffle(docs)
  context = "\n\n".join(DOCUMENT_PROMPT.format(i=i + 1, document=d) for i, d in enumerate(docs))
  spec = TEMPLATES["qa"]
  return spec["template"].format(context=context, query=question), spec["answer_prefix"], [value]


# --- fitting to a token length ---------------------------------------------------------------------------------


def _incremental(task: str, length: int) -> int:
  family, args = TASKS[task]
  if family == "niah":
    if args["type_haystack"] == "essay":
      return 500
    return 5 if length < 4096 else 25
  if family == "variable_tracking":
    return 5 if length < 4096 else 10
  if family == "qa":
    return 2 if length < 4096 else 10
  return 10


class _Task:
  """A task's generator bound to its sources, and its ICL example (vt)."""

  def __init__(self, task: str, length: int, render: Render, seed: int, text: str):
    self.task, self.length, self.render, self.seed = task, length, render, seed
    self.family, self.args = TASKS[task]
    self.essay = ruler_words.essay_words(text)
    # QA prose: sentences of 5-40 words (the prose of the default text holds long code listings)
    self.sentences = [s for s in ruler_words.split_sentences(text) if 5 <= len(s.split()) <= 40
                      ] if self.family == "qa" else ()
    self.icl = self._vt_icl() if self.family == "variable_tracking" else None

  def _vt_icl(self) -> str:
    """RULER's vt in-context example: an ICL-style chain (3-letter names, value 12345) fitted to 500 tokens,
    solved."""
    rng_seed = f"{self.seed}:vt-icl"

    def make(n):
      return _vt_generate(self.args, n, random.Random(rng_seed), icl=True)

    n = _search(lambda n: len(self.render(*make(n)[:2])), 500, 5)
    text, prefix, names = make(n)
    return text + prefix + " " + " ".join(names) + "\n"

  def make(self, n: int, rng: random.Random):
    if self.family == "niah":
      return _niah_generate(self.args, n, rng, self.seed, self.essay)
    if self.family == "variable_tracking":
      text, prefix, names = _vt_generate(self.args, n, rng)
      return _vt_randomize_icl(self.icl, self.args["num_hops"], rng) + "\n" + text, prefix, names
    if self.family == "common_words_extraction":
      return _cwe_generate(self.args, n, rng, self.seed, self.length)
    if self.family == "freq_words_extraction":
      return _fwe_generate(self.args, n, rng, self.seed, self.length)
    return _qa_generate(self.args, n, rng, self.seed, self.sentences)


def _search(count: Callable[[int], int], budget: int, incremental: int, probe: int | None = None,
            slack: int = 3) -> int:
  """RULER's binary search: the largest haystack size n in [incremental, slack x the estimate] with
  count(n) <= budget, the estimate being budget / (count(probe) / probe); `incremental` when none fits (the
  caller then checks and reports)."""
  probe = probe or incremental
  per_unit = max(count(probe) / probe, 1e-9)
  low, high = incremental, max(int(budget / per_unit * slack), incremental * 2)
  best = None
  while low <= high:
    mid = (low + high) // 2
    if count(mid) <= budget:
      best, low = mid, mid + 1
    else:
      high = mid - 1
  return best if best is not None else incremental


def sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
  """The RNG of one sample: a pure function of (seed, task, length, index)."""
  return random.Random(f"{seed}:{task}:{length}:{index}")


def generate(task: str, length: int, num_samples: int, render: Render, *, seed: int = 42,
             text: str | None = None) -> list[RulerSample]:
  """`num_samples` prompts of `task`, each with len(ids) + tokens_to_generate <= `length`.

  Args:
    task: a name of `TASKS`.
    length: the token budget (RULER's max_seq_length: prompt + generated tokens).
    num_samples: how many.
    render: (input, answer prefix) -> ids (the model's tokenizer and chat wrapping): lengths are counted on it.
    seed: the suite's seed (RULER's random_seed, 42).
    text: the essay / passage prose (default `lacax.eval.texts.default_text()`).

  Raises:
    ValueError: an unknown task, or a length too short for the task's prompt with its smallest haystack.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r} must be one of {list(TASKS)}")
  if text is None:
    from lacax.eval.texts import default_text  # pylint: disable=g-import-not-at-top
    text = default_text()
  spec = _Task(task, length, render, seed, text)
  new_tokens = tokens_to_generate(task)
  budget = length - new_tokens
  incremental = _incremental(task, length)
  if spec.family == "freq_words_extraction":
    incremental = max(1, budget // 32)

  def count(n, index=0):
    return len(render(*spec.make(n, sample_rng(seed, task, length, index))[:2]))

  if spec.family == "common_words_extraction":  # RULER estimates the tokens per word on 4096 words
    size = _search(count, budget, incremental, probe=4096, slack=2)
  else:
    size = _search(count, budget, incremental)
  samples = []
  for index in range(num_samples):
    n = size
    while True:
      input_text, prefix, outputs = spec.make(n, sample_rng(seed, task, length, index))
      ids = tuple(render(input_text, prefix))
      if len(ids) <= budget:
        break
      if n <= incremental:
        raise ValueError(f"length {length} is too short for RULER task {task!r}: its prompt with the smallest "
                         f"haystack ({n} units) has {len(ids)} tokens + {new_tokens} to generate")
      n = max(incremental, n - incremental)
    samples.append(RulerSample(task=task, length=length, index=index, input=input_text, answer_prefix=prefix,
                               outputs=tuple(outputs), ids=ids, new_tokens=new_tokens, haystack_size=n))
  return samples


__all__ = ["DEPTHS", "NEEDLE", "NOISE", "RulerSample", "TASKS", "TEMPLATES", "generate", "metric_of",
           "sample_rng", "tokens_to_generate"]
