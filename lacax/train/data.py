"""Training data as fixed-shape batches: packed text and instruction records with answer-only loss masks.

Every batch is a dict of numpy arrays of the same shapes (one compile for the whole run):

  tokens    [B, T] int32   input ids
  targets   [B, T] int32   the next token of each input (0 where there is none)
  mask      [B, T] float32 1 where the target counts in the loss
  positions [B, T] int32   position of each input token, -1 for padding (right padding)

A `SequenceDataset` holds N rows of T + 1 token ids (with a per-token loss mask and a length) and serves
`batch(step)`: a pure function of the step index (rows drawn from a seeded permutation of each epoch), so a
resumed run sees exactly the batches the interrupted one would have.

Sources:
* text (`text_dataset`): a text file, a folder of *.txt files or a JSONL file's text field
  (`lacax.eval.texts.load_text`; "" = the embedded offline default), tokenized, documents joined by EOS and cut
  into windows of T + 1 tokens (stride T): every target counts.
* instruction records (`instruction_dataset`): Alpaca-style `{"instruction", "input", "output"}` records from a
  JSON list or a JSONL file; the prompt is rendered with the tokenizer's chat template (user turn: the
  instruction, then the input), the answer is the assistant turn, and only the answer's tokens (with the
  template's end-of-turn token) count in the loss. One record per row, right-padded to T + 1 and truncated
  beyond it. A record without `instruction` or `output` is an error naming the file, the record and the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lacax.eval import texts

# The Alpaca prompt (tatsu-lab/stanford_alpaca), for tokenizers without a chat template.
ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


@dataclasses.dataclass(frozen=True)
class SequenceDataset:
  """N fixed-length rows and the batches drawn from them.

  Attributes:
    ids: [N, T + 1] int32 token ids (padding: 0).
    loss_mask: [N, T + 1] bool: token j of a row is a target that counts (its mask at j).
    lengths: [N] int32 real tokens per row.
    batch_size: rows per batch.
    seed: seeds the per-epoch shuffles (None: rows in order, no shuffling).
  """

  ids: np.ndarray
  loss_mask: np.ndarray
  lengths: np.ndarray
  batch_size: int
  seed: int | None = 0

  def __post_init__(self):
    if self.ids.ndim != 2 or self.ids.shape[1] < 2:
      raise ValueError(f"ids must be [rows, seq_len + 1] with seq_len >= 1, got shape {self.ids.shape}")
    if self.batch_size < 1:
      raise ValueError(f"data.batch_size={self.batch_size} must be >= 1")
    if len(self.ids) == 0:
      raise ValueError("the data set has no rows (text shorter than one sequence, or no records)")

  @property
  def num_rows(self) -> int:
    return len(self.ids)

  @property
  def seq_len(self) -> int:
    return self.ids.shape[1] - 1

  def rows_at(self, step: int) -> np.ndarray:
    """Row indices of batch `step`: sample s = step * B + j is row perm_e[s mod N] of epoch e = s // N."""
    n = self.num_rows
    samples = step * self.batch_size + np.arange(self.batch_size)
    epochs, within = samples // n, samples % n
    if self.seed is None:
      return within
    out = np.empty_like(within)
    for e in np.unique(epochs):
      perm = np.random.default_rng([self.seed, int(e)]).permutation(n)
      sel = epochs == e
      out[sel] = perm[within[sel]]
    return out

  def rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The batch made of `rows`."""
    ids, mask, lengths = self.ids[rows], self.loss_mask[rows], self.lengths[rows]
    T = self.seq_len
    t = np.arange(T)[None, :]
    has_target = t + 1 < lengths[:, None]
    return {
        "tokens": ids[:, :-1].astype(np.int32),
        "targets": np.where(has_target, ids[:, 1:], 0).astype(np.int32),
        "mask": (mask[:, 1:] & has_target).astype(np.float32),
        "positions": np.where(t < lengths[:, None], t, -1).astype(np.int32),
    }

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Batch `step` (a pure function of the step)."""
    return self.rows(self.rows_at(step))

  def split(self, eval_rows: int) -> tuple["SequenceDataset", "SequenceDataset"]:
    """(train, held-out): the last `eval_rows` rows are held out."""
    if not 0 < eval_rows < self.num_rows:
      raise ValueError(f"data.eval_rows={eval_rows} must lie in [1, {self.num_rows - 1}] (the data has "
                       f"{self.num_rows} rows)")
    cut = self.num_rows - eval_rows
    train = dataclasses.replace(self, ids=self.ids[:cut], loss_mask=self.loss_mask[:cut], lengths=self.lengths[:cut])
    held = dataclasses.replace(self, ids=self.ids[cut:], loss_mask=self.loss_mask[cut:], lengths=self.lengths[cut:],
                               seed=None)
    return train, held

  def eval_batches(self, max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """The rows in order as full batches (a final partial batch is padded with empty rows: mask 0)."""
    out = []
    n_batches = -(-self.num_rows // self.batch_size)
    if max_batches is not None:
      n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
      rows = np.arange(b * self.batch_size, (b + 1) * self.batch_size)
      batch = self.rows(np.minimum(rows, self.num_rows - 1))
      pad = rows >= self.num_rows
      batch["mask"][pad] = 0.0
      batch["positions"][pad] = -1
      out.append(batch)
    return out


def pack_ids(ids: Sequence[int], seq_len: int, batch_size: int, seed: int | None = 0) -> SequenceDataset:
  """Windows of seq_len + 1 consecutive ids, stride seq_len (every target is the true next token)."""
  ids = np.asarray(ids, np.int32)
  n = (len(ids) - 1) // seq_len
  if n < 1:
    raise ValueError(f"the text has {len(ids)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}")
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  rows = ids[idx]
  return SequenceDataset(rows, np.ones(rows.shape, bool), np.full(n, seq_len + 1, np.int32), batch_size, seed)


def text_dataset(tokenizer: Any, path: str = "", *, seq_len: int, batch_size: int, field: str = "text",
                 seed: int | None = 0, max_chars: int = 0) -> SequenceDataset:
  """Packed windows of a text source (see the module docstring); "" = the embedded default text.

  Documents of a folder or JSONL file are separated by the EOS token (when the tokenizer has one).
  """
  if path and (os.path.isdir(path) or path.endswith(".jsonl")):
    if os.path.isdir(path):
      docs = [open(f, encoding="utf-8").read() for f in sorted(_glob_txt(path))]
      if not docs:
        raise FileNotFoundError(f"data.path={path!r} is a folder without *.txt files")
    else:
      docs = texts._read_jsonl(path, field)  # pylint: disable=protected-access
  else:
    docs = [texts.load_text(path, field)]
  if max_chars:
    docs = _cap_chars(docs, max_chars)
  ids: list[int] = []
  for i, doc in enumerate(docs):
    if i and tokenizer.eos_id is not None:
      ids.append(tokenizer.eos_id)
    ids.extend(tokenizer.encode(doc))
  return pack_ids(ids, seq_len, batch_size, seed)


def _glob_txt(path: str) -> list[str]:
  return [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt")]


def _cap_chars(docs: list[str], max_chars: int) -> list[str]:
  out, left = [], max_chars
  for d in docs:
    if left <= 0:
      break
    out.append(d[:left])
    left -= len(d)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Instruction records.
# ----------------------------------------------------------------------------------------------------------------


def load_records(path: str) -> list[tuple[str, dict[str, Any]]]:
  """(where, record) pairs from a JSON list or a JSONL file; `where` names the record ("file, line 3")."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.path={path!r} does not exist (expected a .json or .jsonl instruction file)")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  records = []
  if path.endswith(".jsonl"):
    for line_no, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        records.append((f"{path}, line {line_no}", json.loads(line)))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {line_no}: invalid JSON ({e.msg})") from None
  else:
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, Mapping):
      data = [data]
    if not isinstance(data, list):
      raise ValueError(f"{path}: expected a JSON list of instruction records, got {type(data).__name__}")
    records = [(f"{path}, record {i}", r) for i, r in enumerate(data)]
  return records


def _check_record(where: str, record: Any) -> tuple[str, str, str]:
  if not isinstance(record, Mapping):
    raise ValueError(f"{where}: an instruction record must be a JSON object, got {type(record).__name__}")
  for field in ("instruction", "output"):
    if field not in record:
      raise ValueError(f"{where}: missing field {field!r} (an instruction record needs 'instruction' and "
                       f"'output'; 'input' is optional); it has {sorted(record)}")
    if not isinstance(record[field], str):
      raise ValueError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
  extra = record.get("input", "")
  if extra is None:
    extra = ""
  if not isinstance(extra, str):
    raise ValueError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
  return record["instruction"], extra, record["output"]


def format_instruction(tokenizer: Any, instruction: str, input_text: str, output: str
                       ) -> tuple[list[int], list[int]]:
  """(prompt ids, answer ids) of one record: the chat template's user turn, then the assistant's answer.

  Tokenized in two parts so that the prompt/answer boundary is exact. The answer includes the template's
  end-of-turn text (what a model must learn to stop); without a chat template, the Alpaca prompt and EOS.
  """
  user = instruction if not input_text else f"{instruction}\n\n{input_text}"
  if tokenizer.has_chat_template:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": output}],
                                         add_generation_prompt=False)
    if not full.startswith(prompt):
      raise ValueError("the tokenizer's chat template renders the assistant turn without the generation prompt as "
                       "its prefix; instruction data cannot be masked to the answer with this template")
    prompt_ids = tokenizer.encode(prompt, add_bos=False)
    answer_ids = tokenizer.encode(full[len(prompt):], add_bos=False)
  else:
    prompt = ALPACA_PROMPT.format(with_input=", paired with an input that provides further context" if input_text
                                  else "", instruction=instruction,
                                  input_block=f"### Input:\n{input_text}\n\n" if input_text else "")
    prompt_ids = tokenizer.encode(prompt)
    answer_ids = tokenizer.encode(output, add_bos=False)
    if tokenizer.eos_id is not None:
      answer_ids.append(tokenizer.eos_id)
  return prompt_ids, answer_ids


def instruction_dataset(tokenizer: Any, records: str | Iterable[Mapping[str, Any]], *, seq_len: int,
                        batch_size: int, seed: int | None = 0) -> SequenceDataset:
  """One row per record, loss on the answer tokens only (see the module docstring).

  Args:
    records: a .json / .jsonl path, or records themselves.

  Raises:
    ValueError: a record without `instruction` / `output` (names the record and the field), or no record whose
      answer starts within seq_len tokens.
  """
  pairs = load_records(records) if isinstance(records, str) else [(f"record {i}", r) for i, r in enumerate(records)]
  rows, masks, lengths, truncated = [], [], [], 0
  for where, record in pairs:
    prompt_ids, answer_ids = format_instruction(tokenizer, *_check_record(where, record))
    ids = (prompt_ids + answer_ids)
    mask = [False] * len(prompt_ids) + [True] * len(answer_ids)
    if len(ids) > seq_len + 1:
      truncated += 1
      ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    if not any(mask[1:]):
      logging.warning("%s: the prompt fills data.seq_len=%d tokens; the record has no answer token and is skipped",
                      where, seq_len)
      continue
    n = len(ids)
    rows.append(ids + [0] * (seq_len + 1 - n))
    masks.append(mask + [False] * (seq_len + 1 - n))
    lengths.append(n)
  if truncated:
    logging.warning("%d of %d instruction records were truncated to data.seq_len + 1 = %d tokens", truncated,
                    len(pairs), seq_len + 1)
  if not rows:
    raise ValueError(f"no instruction record has an answer within data.seq_len={seq_len} tokens")
  return SequenceDataset(np.asarray(rows, np.int32), np.asarray(masks, bool), np.asarray(lengths, np.int32),
                         batch_size, seed)
