"""The local lacax model behind the backend protocol: any cache policy, every prompt of a call in one batch.

`LocalBackend.generate(prompts, sampling)` turns each prompt into `sampling.n` rows (completion j of a prompt
samples with its own key `PRNGKey(sampling.seed + j)`, so it reproduces whatever else shares the batch) and runs
all rows of the call through one `lacax.generate.generate_stream`: one prefill, one compiled decode loop,
returning to the host every `chunk` steps to check stop strings (a row that has produced one is marked done and
costs nothing further). Raw text prompts are continued as they are (BOS prepended when the tokenizer says so);
chats go through the tokenizer's chat template with the generation prompt.

Capabilities:
  raw_prefix   `continue_(prompt, prefix)` continues a prompt plus a prefix inside the model's own answer
               (text, or the exact token ids of an earlier completion plus a cue), for budget forcing
               (ScaleRTL, arXiv 2506.05566; s1, arXiv 2501.19393). The prefix is prefilled again: the
               continuation does not reuse the earlier call's KV cache. `session(...)` instead keeps the
               cache between rounds (`lacax.hw.backends.session.KVSession`: a cue is a chunked prefill of
               its own tokens only).
  logprobs     the log-probability of every generated token under the model (log-softmax of the raw logits,
               before temperature and top-p), equal to a teacher-forced forward's.
  embeddings   `embed(texts, pooling)`: the mean over the text's tokens (default) or the last token of the
               final hidden states after the final RMSNorm, [N, hidden_size].

`counters` counts tokens by how they entered the model: "prefill_tokens" (prompts of `generate` /
`continue_` / a session's first round), "extend_tokens" (tokens a session appended into its cache) and
"generated_tokens", so a caller can check that a continuation did not prefill again.

Finish reasons: "stop" when the model produced a stop token (the tokenizer's EOS / end-of-turn ids) or a stop
string; "length" when `max_tokens` ran out. `Completion.tokens` holds the generated ids up to and including the
stop token, or up to the token that completed a stop string; `text` never contains either.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lacax import generate as generation
from lacax.cache import registry
from lacax.cache.base import CachePolicy
from lacax.cache.full import FullPolicy
from lacax.hw.backends.base import Completion, Prompt, Sampling, is_chat, truncate_at_stop
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.sampling import SamplingConfig

POOLINGS = ("mean", "last")


@dataclasses.dataclass(frozen=True)
class Row:
  """One completion to generate: prompt ids, its token limit, its seed and its stop strings."""

  ids: tuple[int, ...]
  max_tokens: int
  seed: int = 0
  stop: tuple[str, ...] = ()


class RowText:
  """Text of one row as its tokens arrive: stop strings cut it, and `update` returns only text that is final.

  Held back until the row ends: a trailing partial UTF-8 character (decoded as U+FFFD) and any tail that could
  still grow into a stop string. So the deltas of `update` concatenate to `text` exactly, for streaming.
  """

  def __init__(self, tokenizer, stop: Sequence[str], stop_ids: Sequence[int]):
    self.tokenizer = tokenizer
    self.stop = tuple(stop)
    self.stop_ids = frozenset(int(i) for i in stop_ids)
    self.emitted = ""
    self.text = ""
    self.num_tokens = 0  # tokens that belong to the completion
    self.finish_reason: str | None = None

  def _decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=True)

  def stopped_by_string(self, tokens: Sequence[int]) -> bool:
    """Whether `tokens` already contain a stop string (checked at decode time, every chunk)."""
    return bool(self.stop) and truncate_at_stop(self._decode(tokens), self.stop)[1]

  def update(self, tokens: Sequence[int], done: bool) -> str:
    """Takes the row's tokens so far (and whether it is done); returns the new final text."""
    if self.finish_reason is not None:
      return ""
    tokens = list(tokens)
    ended_by_token = bool(tokens) and tokens[-1] in self.stop_ids
    body = tokens[:-1] if ended_by_token else tokens
    text, found = truncate_at_stop(self._decode(body), self.stop)
    if found:
      # The earliest token count whose text holds the stop string: the tokens the completion keeps.
      count = next(k for k in range(1, len(body) + 1) if truncate_at_stop(self._decode(body[:k]), self.stop)[1])
      self.num_tokens, self.finish_reason = count, "stop"
    elif done:
      self.num_tokens = len(tokens)
      self.finish_reason = "stop" if ended_by_token else "length"
    if self.finish_reason is not None:
      final = text
    else:
      final = text[:-1] if text.endswith("\ufffd") else text
      hold = max((k for s in self.stop for k in range(1, len(s)) if final.endswith(s[:k])), default=0)
      final = final[:len(final) - hold]
    if self.finish_reason is not None:
      self.text = final
    if not final.startswith(self.emitted):  # the tokenizer revised earlier text: nothing more can be streamed
      return ""
    delta, self.emitted = final[len(self.emitted):], final
    return delta


class LocalBackend:
  """A lacax model (`lacax.weights.loader.Model`) generating through `lacax.generate`.

  Attributes:
    model: the loaded model (config, parameters, tokenizer).
    policy: the cache policy every generation uses.
    chunk: decode steps between host checks (stop strings, streaming).
    bucket: prompt padding multiple (fewer compilations).
    max_batch: rows per batched generate; more rows are split into consecutive batches.
    context_length: prompt + max_tokens must fit (default the model's max_position_embeddings).
    token_bucket: the compiled decode loop's bound is the largest max_tokens rounded up to a multiple of this
      (each row still stops at its own limit), so requests with different limits share compilations.
    pad_batch: pad a batch's rows to a power of two with one-token dummy rows (fewer compilations when the
      number of rows varies, as in a server; the dummy rows stop after their first token).
    min_batch: pad every batch to at least this many rows (with `max_batch`, one batch shape for every call).
  """

  capabilities = frozenset({"raw_prefix", "logprobs", "embeddings"})

  def __init__(self, model, *, policy: CachePolicy | None = None, chunk: int = 8, bucket: int = 64,
               max_batch: int = 64, context_length: int | None = None, token_bucket: int = 32,
               pad_batch: bool = True, min_batch: int = 1):
    if model.tokenizer is None:
      raise ValueError(f"model {model.source!r} has no tokenizer; LocalBackend needs one to read text prompts")
    for name, value in (("chunk", chunk), ("bucket", bucket), ("max_batch", max_batch),
                        ("token_bucket", token_bucket), ("min_batch", min_batch)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    self.model = model
    self.policy = policy or FullPolicy()
    self.chunk, self.bucket, self.max_batch = chunk, bucket, max_batch
    self.token_bucket, self.pad_batch, self.min_batch = token_bucket, bool(pad_batch), min(min_batch, max_batch)
    self.context_length = int(context_length or model.cfg.max_position_embeddings)
    self.counters: collections.Counter = collections.Counter()
    if isinstance(self.policy, FullPolicy) and self.policy.capacity:
      self.context_length = min(self.context_length, int(self.policy.capacity))

  @classmethod
  def load(cls, path: str | None = None, *, dtype: str = "float32", cache_policy: str = "full",
           cache: Mapping[str, Any] | None = None, **kwargs) -> "LocalBackend":
    """Loads a checkpoint directory, a GGUF file or (None) the embedded default, with the policy `cache_policy`
    built by `lacax.cache.registry.make_policy` from the `cache` fields (size, start_size, ...)."""
    from lacax.weights.loader import load_model  # pylint: disable=g-import-not-at-top

    policy = registry.make_policy(cache_policy, dict(cache or {}))
    return cls(load_model(path, dtype=dtype), policy=policy, **kwargs)

  @property
  def tokenizer(self):
    return self.model.tokenizer

  def describe(self) -> dict[str, Any]:
    return {"kind": "local", "model": self.model.cfg.name, "source": self.model.source,
            "dtype": self.model.cfg.dtype, "policy": repr(self.policy), "context_length": self.context_length}

  # --- prompts ------------------------------------------------------------------------------------------------

  def encode_prompt(self, prompt: Prompt) -> list[int]:
    """Token ids of a raw text prompt (as is) or a chat (the chat template with the generation prompt)."""
    tok = self.tokenizer
    if is_chat(prompt):
      text = tok.apply_chat_template([dict(m) for m in prompt], add_generation_prompt=True)
      return tok.encode(text, add_bos=False)
    return tok.encode(prompt)

  def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
    """Raises ValueError naming the context length unless the prompt plus `max_tokens` fit."""
    if num_prompt_tokens < 1:
      raise ValueError("the prompt is empty: it needs at least one token")
    if num_prompt_tokens + max_tokens > self.context_length:
      raise ValueError(f"this model's maximum context length is {self.context_length} tokens; the prompt has "
                       f"{num_prompt_tokens} tokens and max_tokens is {max_tokens} "
                       f"({num_prompt_tokens + max_tokens} in all)")

  # --- generation ---------------------------------------------------------------------------------------------

  def generate(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[list[Completion]]:
    """Per prompt, `sampling.n` completions; all rows of the call in one batched generate."""
    return self.generate_ids([self.encode_prompt(p) for p in prompts], sampling)

  def continue_(self, prompts: Sequence[Prompt], prefixes: Sequence[str | Sequence[int]],
                sampling: Sampling) -> list[list[Completion]]:
    """Continues each prompt from inside its answer: prompt ids + the prefix (text, encoded without BOS, or
    token ids, e.g. an earlier completion's `tokens` plus a cue, continued exactly, with no re-tokenization).

    The completions hold only what follows the prefix."""
    if len(prefixes) != len(prompts):
      raise ValueError(f"prefixes has {len(prefixes)} entries; expected one per prompt ({len(prompts)})")
    ids = []
    for prompt, prefix in zip(prompts, prefixes):
      extra = self.tokenizer.encode(prefix, add_bos=False) if isinstance(prefix, str) else [int(t) for t in prefix]
      ids.append(self.encode_prompt(prompt) + extra)
    return self.generate_ids(ids, sampling)

  def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[list[Completion]]:
    """`generate` from token-id prompts."""
    rows = [Row(ids=tuple(int(t) for t in p), max_tokens=sampling.max_tokens, seed=sampling.seed + j,
                stop=sampling.stop) for p in prompts for j in range(sampling.n)]
    for row in rows:
      self.check_length(len(row.ids), row.max_tokens)
    completions = self.run_rows(rows, sampling_config(sampling), logprobs=sampling.logprobs)
    return [completions[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompts))]

  def run_rows(self, rows: Sequence[Row], sampling: SamplingConfig, *, logprobs: bool = False,
               on_chunk: Callable[[list[str], np.ndarray], None] | None = None) -> list[Completion]:
    """Generates every row (batches of at most `max_batch`), sharing one sampling configuration.

    Args:
      rows: prompts with their own token limits, seeds and stop strings.
      sampling: temperature / top-k / top-p of every row.
      logprobs: return each completion's token log-probabilities.
      on_chunk: called after every decode chunk of a batch with the new final text of each row of `rows`
        ("" for rows of other batches or with nothing new) and which rows have finished: for streaming.

    Returns:
      one `Completion` per row.
    """
    results: list[Completion] = []
    for start in range(0, len(rows), self.max_batch):
      batch = list(rows[start:start + self.max_batch])
      real = len(batch)
      width = self.batch_width(real)
      batch += [Row(ids=batch[0].ids[:1], max_tokens=1)] * (width - real)
      texts = [RowText(self.tokenizer, row.stop, self.tokenizer.stop_ids) for row in batch]
      self.counters["prefill_tokens"] += sum(len(row.ids) for row in batch[:real])

      def stop_rows(tokens, texts=texts):
        return [text.stopped_by_string(t) for text, t in zip(texts, tokens)]

      longest_prompt = max(len(row.ids) for row in batch)
      longest_new = max(row.max_tokens for row in batch)
      loop_tokens = -(-longest_new // self.token_bucket) * self.token_bucket
      loop_tokens = max(longest_new, min(loop_tokens, self.context_length - longest_prompt))
      last = None
      for last in generation.generate_stream(
          self.model.params, self.model.cfg, [row.ids for row in batch],
          max_new_tokens=[row.max_tokens for row in batch], sampling=sampling,
          stop_ids=self.tokenizer.stop_ids, policy=self.policy, seeds=[row.seed for row in batch],
          bucket=self.bucket, chunk=self.chunk, return_logprobs=logprobs, loop_tokens=loop_tokens,
          stop_rows=stop_rows if any(row.stop for row in batch) else None):
        deltas = [text.update(t, bool(d)) for text, t, d in zip(texts, last.tokens, last.done)]
        if on_chunk is not None:
          all_deltas = [""] * len(rows)
          all_done = np.zeros(len(rows), bool)
          all_done[:start] = True
          all_deltas[start:start + real] = deltas[:real]
          all_done[start:start + real] = last.done[:real]
          on_chunk(all_deltas, all_done)
      for b, text in enumerate(texts[:real]):
        kept = last.tokens[b][:text.num_tokens]
        lps = None if last.logprobs is None else tuple(float(x) for x in last.logprobs[b][:text.num_tokens])
        results.append(Completion(text=text.text, finish_reason=text.finish_reason, tokens=tuple(kept),
                                  logprobs=lps))
        self.counters["generated_tokens"] += len(kept)
    return results

  def batch_width(self, rows: int) -> int:
    """The rows a batch of `rows` real rows is padded to: a power of two (`pad_batch`, at most max_batch unless
    there are more real rows), at least `min_batch`."""
    width = min(1 << (rows - 1).bit_length(), max(self.max_batch, rows)) if self.pad_batch else rows
    return max(width, self.min_batch)

  def session(self, prompts: Sequence[Prompt], sampling: Sampling, *, capacity: int):
    """A `lacax.hw.backends.session.KVSession`: `sampling.n` rows per prompt that keep their KV cache between
    rounds of generation (`capacity`: prompt + every token the rounds will generate or append)."""
    from lacax.hw.backends.session import KVSession  # pylint: disable=g-import-not-at-top

    return KVSession(self, [self.encode_prompt(p) for p in prompts], sampling, capacity=capacity)

  # --- embeddings ---------------------------------------------------------------------------------------------

  def embed(self, texts: Sequence[str], pooling: str = "mean") -> np.ndarray:
    """[N, hidden_size] float32: the mean over each text's tokens (or its last token) of the final hidden
    states, after the final RMSNorm."""
    if pooling not in POOLINGS:
      raise ValueError(f"pooling={pooling!r} must be one of {POOLINGS}")
    ids = [self.tokenizer.encode(t) for t in texts]
    for i in ids:
      self.check_length(len(i), 0)
    tokens, lengths = generation.pad_prompts(ids, self.bucket)
    cfg = self.model.cfg
    hidden = _final_hidden(self.model.params, jnp.asarray(tokens), jnp.asarray(lengths), cfg=cfg)
    hidden = np.asarray(hidden)
    mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    if pooling == "last":
      return hidden[np.arange(len(ids)), lengths - 1]
    return (hidden * mask[:, :, None]).sum(1) / lengths[:, None]


def sampling_config(sampling: Sampling) -> SamplingConfig:
  """The `lacax.sampling.SamplingConfig` of protocol sampling parameters."""
  return SamplingConfig(temperature=float(sampling.temperature), top_p=float(sampling.top_p))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _final_hidden(params, tokens: jax.Array, lengths: jax.Array, *, cfg: ModelConfig) -> jax.Array:
  """[B, T, D] final hidden states (after the final RMSNorm) of right-padded prompts.

  `llama.forward` projects the normed states onto its unembedding; an identity [D, D] head in its place (untied)
  makes that projection return the states themselves.
  """
  batch, width = tokens.shape
  t = jnp.arange(width, dtype=jnp.int32)[None, :]
  positions = jnp.where(t < lengths[:, None], t, -1)
  head_cfg = cfg.replace(tie_word_embeddings=False)
  head_params = {**params, "lm_head": jnp.eye(cfg.hidden_size, dtype=cfg.jnp_dtype)}
  cache = FullPolicy().init(head_cfg, batch, width)
  hidden, _ = llama.forward(head_params, tokens, positions, cache, head_cfg)
  return hidden
