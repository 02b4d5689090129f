"""What the one-shot evaluations (passkey / NIAH, LongBench) share besides `lacax.generate.oneshot_generate`:
the config checks of their policy fields, and the generation of a group of prompts under every policy.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from lacax import errors
from lacax import generate as generation
from lacax.cache import registry
from lacax.cache.base import CachePolicy
from lacax.eval.texts import text_problems
from lacax.weights import loader


def oneshot_field_problems(config: ml_collections.ConfigDict, budget_of: str) -> list[str]:
  """Problems of `batch_size`, `policies` and `cache.budget` (a fraction of `budget_of`); [] when none."""
  problems = []
  if not (isinstance(config.batch_size, int) and config.batch_size >= 1):
    problems.append(f"batch_size={config.batch_size!r} must be an int >= 1")
  if not config.policies:
    problems.append("policies is empty: expected names such as ('full', 'streaming', 'lacache')")
  for name in config.policies:
    if name not in registry.POLICIES:
      problems.append(f"policies contains {name!r}; expected names from {sorted(registry.POLICIES)}")
  if len(set(config.policies)) != len(config.policies):
    problems.append(f"policies={tuple(config.policies)!r} has duplicates")
  budget = config.cache.budget
  if not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0):
    problems.append(f"cache.budget={budget!r} must be a positive fraction of {budget_of} (0.5 in the LaCache paper)")
  return problems


def policy_problems(config: ml_collections.ConfigDict, cfg, prompt_lengths: Sequence[int], **kwargs: Any
                    ) -> list[str]:
  """Every policy of `config.policies` built for each prompt length against the model config `cfg`; the
  failures as messages (e.g. a ladder span not below the model's layer count, or a calibration file the policy
  needs and lacks: `CachePolicy.run_problems`)."""
  problems = []
  for name in config.policies:
    for length in sorted(set(prompt_lengths)):
      try:
        policy = registry.make_prefill_policy(name, config.cache, cfg, prompt_len=length, **kwargs)
        policy.decode_capacity(cfg, length + 1)
      except ValueError as e:
        problems.append(f"policy {name!r} for a {length}-token prompt on {cfg.name} ({cfg.num_layers} layers): {e}")
        break
      missing = policy.run_problems(cfg)
      if missing:
        problems.extend(f"policy {name!r}: {m}" for m in missing)
        break
  return problems


def generate_group(model, prompts: Sequence[Sequence[int]], policies_for: Callable[[int], Mapping[str, CachePolicy]],
                   *, batch_size: int, max_new_tokens: Callable[[Sequence[int]], int], stop_ids: Sequence[int],
                   names: Sequence[str]) -> dict[str, Any]:
  """Greedy outputs of `prompts` under every policy, batching prompts that get the same policies.

  Args:
    model: a `lacax.weights.loader.Model`.
    prompts: token ids per prompt.
    policies_for: prompt index -> {name: policy}.
    batch_size: prompts per batch at most.
    max_new_tokens: the indices of a batch -> its decode length.
    stop_ids: a row stops after one of these.
    names: the policy names, in output order.

  Returns:
    {"outputs": {name: generated ids per prompt}, "prefill_seconds", "prompt_tokens", "decode_seconds": {name}}.
  """
  outputs: dict[str, list[list[int]]] = {name: [[] for _ in prompts] for name in names}
  prefill_seconds, prompt_tokens = 0.0, 0
  decode_seconds = collections.Counter()
  order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # equal lengths batch together
  for members, policies in generation.batches_by_policy(order, policies_for, batch_size):
    result = generation.oneshot_generate(model.params, model.cfg, [prompts[i] for i in members], policies,
                                         max_new_tokens=max_new_tokens(members), stop_ids=stop_ids)
    prefill_seconds += result.prefill_seconds
    prompt_tokens += result.prompt_tokens
    decode_seconds.update(result.decode_seconds)
    for name in names:
      for row, i in enumerate(members):
        outputs[name][i] = result.tokens[name][row]
  return {"outputs": outputs, "prefill_seconds": prefill_seconds, "prompt_tokens": prompt_tokens,
          "decode_seconds": {name: float(decode_seconds[name]) for name in names}}


def validate_before_loading(config: ml_collections.ConfigDict, field_problems: Sequence[str], *, lengths_field: str,
                            lengths: Sequence[int], answer_room: int = 0, haystack: bool = True) -> None:
  """The one-shot jobs' (passkey, NIAH, RULER) check before any work: their own field problems, the haystack
  text (if the job reads one), the model path, every prompt length against the model's context (plus
  `answer_room` generated tokens; 0 when the lengths already count them) and every policy against the model's
  shape. Raises one `lacax.errors.ValidationError` listing every problem, before the model is loaded."""
  problems = errors.Problems()
  problems.extend(field_problems)
  if haystack:
    problems.extend(text_problems(config.haystack.path, config.haystack.field,
                                  encoding=config.haystack.get("encoding", "utf-8"), option="haystack"))
  problems.extend(loader.model_path_problems(config.model.path, "model.path"))
  if not problems:
    cfg = loader.read_model_config(config.model.path or None, dtype=config.model.dtype)
    too_long = [n for n in lengths if n + answer_room > cfg.max_position_embeddings]
    counted = f"(+ about {answer_room} answer tokens)" if answer_room else "(prompt + generated tokens)"
    problems.check(not too_long, f"{lengths_field} has {too_long} tokens {counted}, beyond the context of "
                   f"{cfg.name} (max_position_embeddings={cfg.max_position_embeddings}); drop those lengths or "
                   "pass --config.model.path for a longer-context model")
    problems.extend(policy_problems(config, cfg, lengths, protocol="niah"))
  problems.raise_if_any(f"{config.experiment} config")
