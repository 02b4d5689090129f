"""The `generate` job: generate text from a prompt and report tokens/s."""

from __future__ import annotations

import logging
from typing import Any

import ml_collections

from lacax import generate as generation
from lacax import jobs
from lacax.cache.full import FullPolicy
from lacax.sampling import SamplingConfig


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict[str, Any]:
  del run_dir  # everything this job measures goes into results.json
  model = jobs.model_from_config(config)
  tok = model.tokenizer
  if tok is None:
    raise ValueError(f"model.path={config.model.path!r} has no tokenizer; the generate job needs one")
  prompts = [config.prompt] if isinstance(config.prompt, str) else list(config.prompt)
  if config.chat and tok.has_chat_template:
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
             for p in prompts]
    ids = [tok.encode(t, add_bos=False) for t in texts]
  else:
    ids = [tok.encode(p) for p in prompts]
  sampling = SamplingConfig(temperature=config.sampling.temperature, top_k=config.sampling.top_k,
                            top_p=config.sampling.top_p)
  stop_ids = tuple(tok.stop_ids) if config.stop_at_eos else ()
  kwargs = dict(max_new_tokens=config.max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                policy=FullPolicy(rope_mode=config.get("rope_mode", "slot")), seed=config.seed,
                mesh_rules=model.mesh_rules)
  if config.warmup:
    # Compile once on the same shapes so the reported speed is steady-state.
    generation.generate(model.params, model.cfg, ids, **kwargs)
  result = generation.generate(model.params, model.cfg, ids, **kwargs)
  outputs = []
  for prompt, out in zip(prompts, result.tokens):
    text = tok.decode(out, skip_special_tokens=True)
    outputs.append({"prompt": prompt, "completion": text, "tokens": out})
    print(f"\n>>> {prompt}\n{text}\n")
  figures = {
      "prompt_tokens": result.prompt_tokens, "generated_tokens": result.generated_tokens,
      "prefill_tokens_per_second": result.prefill_tokens_per_second,
      "decode_tokens_per_second": result.decode_tokens_per_second,
  }
  logging.info("generate: %s", figures)
  print(f"prefill: {result.prompt_tokens} tokens, {result.prefill_tokens_per_second:.1f} tokens/s; "
        f"decode: {result.generated_tokens} tokens, {result.decode_tokens_per_second:.1f} tokens/s "
        f"({model.cfg.name}, {model.cfg.dtype})")
  return {"outputs": outputs, "figures": figures, "model_fingerprint": model.fingerprint()}
