"""Hugging Face wav2vec2 / XLSR-53 directories -> lacax's param pytree (no hub access, no transformers import).

Reads `config.json` plus `model.safetensors` (numpy, no torch), `flax_model.msgpack` (transformers 4.x Flax
exports) or `pytorch_model.bin` (needs torch). Only the "stable layer norm" layout (`do_stable_layer_norm=true`,
pre-LN blocks, as in XLSR-53 and wav2vec2-large-lv60) is supported; post-LN checkpoints are refused by name.

Key mapping (torch layout -> lacax; Linear (out, in) -> (in, out), Conv1d (out, in, k) -> (k, in, out)):
  [wav2vec2.]feature_extractor.conv_layers.{i}.conv.{weight,bias}  -> feature_extractor/conv{i}/{kernel,bias}
  [wav2vec2.]feature_extractor.conv_layers.{i}.layer_norm.*        -> feature_extractor/conv{i}/norm
  [wav2vec2.]feature_projection.layer_norm / .projection           -> feature_projection/norm / proj
  [wav2vec2.]encoder.pos_conv_embed.conv.{weight_g,weight_v,bias}  -> pos_conv (weight norm over dims 0, 1)
     (or .parametrizations.weight.original0 / original1)
  [wav2vec2.]encoder.layers.{n}.attention.{q,k,v,out}_proj         -> layers/{q,k,v,o} (stacked over n)
  [wav2vec2.]encoder.layers.{n}.layer_norm / final_layer_norm      -> layers/ln1 / ln2
  [wav2vec2.]encoder.layers.{n}.feed_forward.intermediate_dense / output_dense -> layers/fc1 / fc2
  [wav2vec2.]encoder.layer_norm                                    -> ln_out
  lm_head                                                          -> head (CTC checkpoints only)
"""

from __future__ import annotations

import json
import os

import numpy as np

from lacax.asr import model


def config_from_hf(hf: dict, vocab_size: int | None = None) -> model.EncoderConfig:
  """EncoderConfig from a wav2vec2 `config.json` dict; refuses layouts lacax does not implement."""
  if not hf.get("do_stable_layer_norm", False):
    raise ValueError("wav2vec2 config: do_stable_layer_norm=false (post-LN layout, e.g. wav2vec2-base) is not "
                     "supported; lacax implements the stable-layer-norm layout of XLSR-53 / large-lv60")
  if hf.get("hidden_act", "gelu") != "gelu" or hf.get("feat_extract_activation", "gelu") != "gelu":
    raise ValueError(f"wav2vec2 config: activations {hf.get('hidden_act')}/{hf.get('feat_extract_activation')}"
                     " are not supported (expected gelu)")
  if hf.get("num_conv_pos_embedding_groups") is None or hf.get("num_conv_pos_embeddings") is None:
    raise ValueError("wav2vec2 config lacks num_conv_pos_embeddings / num_conv_pos_embedding_groups")
  return model.EncoderConfig(
      frontend="wav2vec2", d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
      pos_conv_kernel=hf["num_conv_pos_embeddings"], pos_conv_groups=hf["num_conv_pos_embedding_groups"],
      conv_dim=tuple(hf["conv_dim"]), conv_kernel=tuple(hf["conv_kernel"]), conv_stride=tuple(hf["conv_stride"]),
      conv_bias=bool(hf.get("conv_bias", False)), feat_extract_norm=hf.get("feat_extract_norm", "group"),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
      vocab_size=vocab_size or hf.get("vocab_size", 32))


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  st, msgpack, binf = (os.path.join(path, n) for n in ("model.safetensors", "flax_model.msgpack",
                                                        "pytorch_model.bin"))
  if os.path.exists(st):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(st))
  if os.path.exists(binf):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{binf}: reading pytorch_model.bin needs torch (or convert to safetensors)") from e
    return {k: v.float().numpy() for k, v in torch.load(binf, map_location="cpu", weights_only=True).items()}
  if os.path.exists(msgpack):
    raise ValueError(f"{msgpack}: Flax msgpack checkpoints use Flax key names; convert to safetensors first "
                     "(transformers<5: model.save_pretrained(..., safe_serialization=True))")
  raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def load(path: str, vocab_size: int | None = None) -> tuple[dict, model.EncoderConfig]:
  """Loads a local HF wav2vec2 directory. Returns (params, cfg); a head is random-free only if `lm_head`
  exists, otherwise params has no "head" (create one with `model.init_head`)."""
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  cfg = config_from_hf(hf, vocab_size)
  raw = _read_tensors(path)
  prefix = "wav2vec2." if any(k.startswith("wav2vec2.") for k in raw) else ""
  used = set()

  def get(name):
    key = prefix + name
    if key not in raw:
      raise KeyError(f"{path}: missing tensor {key!r}")
    used.add(key)
    return np.asarray(raw[key], np.float32)

  def linear(name):
    return {"kernel": get(name + ".weight").T, "bias": get(name + ".bias")}

  def norm(name):
    return {"scale": get(name + ".weight"), "bias": get(name + ".bias")}

  params = {"feature_extractor": {}}
  for i in range(len(cfg.conv_dim)):
    base = f"feature_extractor.conv_layers.{i}"
    layer = {"kernel": get(base + ".conv.weight").transpose(2, 1, 0)}
    if cfg.conv_bias:
      layer["bias"] = get(base + ".conv.bias")
    if cfg.feat_extract_norm == "layer" or i == 0:
      layer["norm"] = norm(base + ".layer_norm")
    params["feature_extractor"][f"conv{i}"] = layer
  params["feature_projection"] = {"norm": norm("feature_projection.layer_norm"),
                                  "proj": linear("feature_projection.projection")}
  pc = "encoder.pos_conv_embed.conv"
  if prefix + pc + ".weight_g" in raw:
    g, v = get(pc + ".weight_g"), get(pc + ".weight_v")
  else:
    g, v = get(pc + ".parametrizations.weight.original0"), get(pc + ".parametrizations.weight.original1")
  weight = g * v / np.linalg.norm(v, axis=(0, 1), keepdims=True)  # torch weight_norm(dim=2)
  params["pos_conv"] = {"kernel": weight.transpose(2, 1, 0), "bias": get(pc + ".bias")}
  names = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.out_proj",
           "fc1": "feed_forward.intermediate_dense", "fc2": "feed_forward.output_dense"}
  per_layer = []
  for n in range(cfg.num_layers):
    base = f"encoder.layers.{n}."
    layer = {k: linear(base + v) for k, v in names.items()}
    layer["ln1"], layer["ln2"] = norm(base + "layer_norm"), norm(base + "final_layer_norm")
    per_layer.append(layer)
  import jax  # pylint: disable=g-import-not-at-top
  params["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
  params["ln_out"] = norm("encoder.layer_norm")
  if "lm_head.weight" in raw:
    params["head"] = {"kernel": raw["lm_head.weight"].T.astype(np.float32),
                      "bias": raw["lm_head.bias"].astype(np.float32)}
    used.update({"lm_head.weight", "lm_head.bias"})
    cfg = model.EncoderConfig(**{**cfg.__dict__, "vocab_size": params["head"]["bias"].shape[0]})
  ignored = {k for k in raw if k not in used and not k.endswith("masked_spec_embed")
             and "quantizer" not in k and "project_" not in k}
  if ignored:
    raise ValueError(f"{path}: tensors not understood by the wav2vec2 mapping: {sorted(ignored)[:8]}")
  return jax.tree.map(np.asarray, params), cfg
