"""Speech encoders + CTC head as pure functions over a parameter pytree.

Two front ends share one transformer encoder, laid out exactly like wav2vec2's "stable layer norm" encoder
(Baevski et al. 2020, arXiv 2006.11477; XLSR-53, Conneau et al. 2020, arXiv 2006.13979):

  frontend "wav2vec2": raw audio -> 7 conv layers (+ layer norm / group norm) -> feature projection
  frontend "logmel":   log-mel features -> 2 stride-2 convs (4x subsampling): the light encoder for CPU runs
  then: x += GELU(weight-normed grouped pos-conv(x)); N pre-LN blocks (x += attn(LN(x)); x += FFN(LN(x)));
  final LN; CTC head.

Layers are stacked on a leading axis and run under `lax.scan`. Param tree:
  {"subsample" | "feature_extractor" + "feature_projection", "pos_conv", "layers": {ln1, q, k, v, o, ln2,
   fc1, fc2}, "ln_out", "head", ["masks"], ["adapters"]}
Masks (artisan.py) replace target kernels per language before the scan; adapters (Houlsby-style bottlenecks
after the FFN, one set per language) ride along the scan. Both are options of the one forward.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lacax.asr import artisan

FRONTENDS = ("logmel", "wav2vec2")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture of an encoder + CTC head (hashable: static under jit).

  Attributes:
    frontend: "logmel" (light encoder over log-mel features) or "wav2vec2" (raw 16 kHz audio).
    d_model, num_layers, num_heads, ffn_dim: transformer sizes.
    pos_conv_kernel, pos_conv_groups: the convolutional position embedding (wav2vec2: 128, 16).
    n_mels, subsample_dim: light frontend input bands and conv width.
    conv_dim, conv_kernel, conv_stride, conv_bias, feat_extract_norm: the wav2vec2 feature encoder.
    layer_norm_eps: every layer norm's epsilon.
    vocab_size: CTC outputs (blank included).
    adapter_dim, adapter_languages: per-language bottleneck adapters (0 = none).
  """
  frontend: str = "logmel"
  d_model: int = 144
  num_layers: int = 4
  num_heads: int = 4
  ffn_dim: int = 576
  pos_conv_kernel: int = 16
  pos_conv_groups: int = 4
  n_mels: int = 40
  subsample_dim: int = 144
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = True
  feat_extract_norm: str = "layer"
  layer_norm_eps: float = 1e-5
  vocab_size: int = 32
  adapter_dim: int = 0
  adapter_languages: int = 0

  def __post_init__(self):
    if self.frontend not in FRONTENDS:
      raise ValueError(f"EncoderConfig.frontend={self.frontend!r}: expected one of {FRONTENDS}")
    if self.d_model % self.num_heads:
      raise ValueError(f"EncoderConfig: d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
    if self.d_model % self.pos_conv_groups:
      raise ValueError(f"EncoderConfig: d_model={self.d_model} not divisible by "
                       f"pos_conv_groups={self.pos_conv_groups}")
    if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
      raise ValueError(f"EncoderConfig: conv_dim/conv_kernel/conv_stride lengths differ: {self.conv_dim}, "
                       f"{self.conv_kernel}, {self.conv_stride}")
    if self.feat_extract_norm not in ("layer", "group"):
      raise ValueError(f"EncoderConfig.feat_extract_norm={self.feat_extract_norm!r}: expected layer or group")
    if self.vocab_size < 2:
      raise ValueError(f"EncoderConfig.vocab_size={self.vocab_size}: expected >= 2 (blank + one label)")

  def output_frames(self, input_frames):
    """Encoder frames for `input_frames` inputs (log-mel frames or audio samples); works on arrays."""
    n = input_frames
    if self.frontend == "logmel":
      for _ in range(2):
        n = (n + 1) // 2
      return n
    for k, s in zip(self.conv_kernel, self.conv_stride):
      n = (n - k) // s + 1
    return n


# ----------------------------------------------------------------------------------------------- building blocks


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = ((x32 - mean)**2).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]).astype(x.dtype)


def dense(p: dict, x: jax.Array) -> jax.Array:
  return x @ p["kernel"] + p["bias"]


def conv1d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding="VALID", groups: int = 1) -> jax.Array:
  """x: [batch, time, cin]; kernel: [k, cin / groups, cout] -> [batch, time', cout]."""
  return jax.lax.conv_general_dilated(x, kernel, (stride,), padding, dimension_numbers=("NWC", "WIO", "NWC"),
                                      feature_group_count=groups)


def gelu(x):
  return jax.nn.gelu(x, approximate=False)


def attention(layer: dict, x: jax.Array, key_mask: jax.Array, num_heads: int) -> jax.Array:
  """Multi-head self-attention. x: [batch, time, d]; key_mask: [batch, time] (1 = valid)."""
  b, t, d = x.shape
  hd = d // num_heads
  q = dense(layer["q"], x).reshape(b, t, num_heads, hd) * (hd**-0.5)
  k = dense(layer["k"], x).reshape(b, t, num_heads, hd)
  v = dense(layer["v"], x).reshape(b, t, num_heads, hd)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
  logits = jnp.where(key_mask[:, None, None, :] > 0, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
  return dense(layer["o"], out)


def block(layer: dict, adapter: dict | None, x: jax.Array, key_mask: jax.Array, cfg: EncoderConfig):
  """One stable-layer-norm (pre-LN) block, plus an optional bottleneck adapter after the FFN."""
  x = x + attention(layer, layer_norm(layer["ln1"], x, cfg.layer_norm_eps), key_mask, cfg.num_heads)
  h = layer_norm(layer["ln2"], x, cfg.layer_norm_eps)
  x = x + dense(layer["fc2"], gelu(dense(layer["fc1"], h)))
  if adapter is not None:
    x = x + dense(adapter["up"], gelu(dense(adapter["down"], x)))
  return x


# --------------------------------------------------------------------------------------------------- frontends


def subsample(p: dict, feats: jax.Array, frame_mask: jax.Array):
  """Light frontend: [batch, frames, n_mels] -> ([batch, ceil(frames / 4), d], mask)."""
  x = feats * frame_mask[..., None]
  x = gelu(conv1d(x, p["conv1"]["kernel"], 2, ((1, 1),)) + p["conv1"]["bias"])
  x = gelu(conv1d(x, p["conv2"]["kernel"], 2, ((1, 1),)) + p["conv2"]["bias"])
  lengths = frame_mask.sum(-1).astype(jnp.int32)
  out_len = ((lengths + 1) // 2 + 1) // 2
  mask = (jnp.arange(x.shape[1])[None] < out_len[:, None]).astype(feats.dtype)
  return x * mask[..., None], mask


def feature_encoder(p: dict, audio: jax.Array, audio_mask: jax.Array, cfg: EncoderConfig):
  """wav2vec2 conv feature encoder + feature projection: [batch, samples] -> ([batch, frames, d], mask)."""
  x = audio[..., None].astype(jnp.float32)
  for i, (k, s) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride)):
    layer = p["feature_extractor"][f"conv{i}"]
    x = conv1d(x, layer["kernel"], s)
    if "bias" in layer:
      x = x + layer["bias"]
    if cfg.feat_extract_norm == "layer":
      x = layer_norm(layer["norm"], x, cfg.layer_norm_eps)
    elif i == 0:  # "group": GroupNorm with one group per channel, over time, on the first layer only
      mean = x.mean(1, keepdims=True)
      var = ((x - mean)**2).mean(1, keepdims=True)
      x = (x - mean) * jax.lax.rsqrt(var + cfg.layer_norm_eps) * layer["norm"]["scale"] + layer["norm"]["bias"]
    x = gelu(x)
  proj = p["feature_projection"]
  x = dense(proj["proj"], layer_norm(proj["norm"], x, cfg.layer_norm_eps))
  lengths = cfg.output_frames(audio_mask.sum(-1).astype(jnp.int32))
  mask = (jnp.arange(x.shape[1])[None] < lengths[:, None]).astype(x.dtype)
  return x, mask


def pos_conv(p: dict, x: jax.Array, cfg: EncoderConfig) -> jax.Array:
  """wav2vec2's convolutional position embedding (same padding; the extra frame of an even kernel dropped)."""
  k = cfg.pos_conv_kernel
  y = conv1d(x, p["kernel"], 1, ((k // 2, k // 2),), cfg.pos_conv_groups) + p["bias"]
  if k % 2 == 0:
    y = y[:, :-1]
  return gelu(y)


# ----------------------------------------------------------------------------------------------------- forward


def encode(params: dict, inputs: jax.Array, input_mask: jax.Array, cfg: EncoderConfig,
           mask_cfg: artisan.MaskConfig = artisan.MaskConfig(), lang=0):
  """Encoder hidden states.

  Args:
    params: the param tree (module docstring).
    inputs: log-mel [batch, frames, n_mels] ("logmel") or audio [batch, samples] ("wav2vec2").
    input_mask: [batch, frames] / [batch, samples], 1 = valid.
    cfg, mask_cfg: static configs.
    lang: language id (int or traced int32 scalar) selecting masks and adapters.
  Returns:
    hidden [batch, out_frames, d_model], out_mask [batch, out_frames].
  """
  if cfg.frontend == "logmel":
    x, mask = subsample(params["subsample"], inputs, input_mask)
  else:
    x, mask = feature_encoder(params, inputs, input_mask, cfg)
  x = x * mask[..., None]
  x = x + pos_conv(params["pos_conv"], x, cfg)
  layers = artisan.apply_masks(params["layers"], params.get("masks", {}), lang, mask_cfg)
  adapters = None
  if "adapters" in params:
    adapters = jax.tree.map(lambda a: jnp.take(a, lang, axis=0), params["adapters"])

  def step(h, xs):
    layer, adapter = xs
    return block(layer, adapter, h, mask, cfg), None

  x, _ = jax.lax.scan(step, x, (layers, adapters))
  return layer_norm(params["ln_out"], x, cfg.layer_norm_eps), mask


def logits(params: dict, inputs: jax.Array, input_mask: jax.Array, cfg: EncoderConfig,
           mask_cfg: artisan.MaskConfig = artisan.MaskConfig(), lang=0, head: dict | None = None):
  """CTC logits [batch, out_frames, vocab] and their frame mask; `head` overrides params["head"]."""
  hidden, mask = encode(params, inputs, input_mask, cfg, mask_cfg, lang)
  return dense(head if head is not None else params["head"], hidden), mask


# -------------------------------------------------------------------------------------------------------- init


def _dense_init(rng, din, dout, scale=None):
  scale = scale if scale is not None else 1.0 / math.sqrt(din)
  return {"kernel": jax.random.normal(rng, (din, dout), jnp.float32) * scale, "bias": jnp.zeros((dout,))}


def _ln(d):
  return {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}


def init_head(rng: jax.Array, d_model: int, vocab_size: int) -> dict:
  return _dense_init(rng, d_model, vocab_size)


def init_layers(rng: jax.Array, cfg: EncoderConfig) -> dict:
  d, f = cfg.d_model, cfg.ffn_dim

  def one(key):
    ks = jax.random.split(key, 6)
    return {"ln1": _ln(d), "q": _dense_init(ks[0], d, d), "k": _dense_init(ks[1], d, d),
            "v": _dense_init(ks[2], d, d), "o": _dense_init(ks[3], d, d), "ln2": _ln(d),
            "fc1": _dense_init(ks[4], d, f), "fc2": _dense_init(ks[5], f, d)}

  return jax.vmap(one)(jax.random.split(rng, cfg.num_layers))


def init_adapters(rng: jax.Array, cfg: EncoderConfig) -> dict:
  """[languages, layers, ...] bottlenecks; the up projection starts at 0 so every adapter starts as identity."""
  n, d, h = cfg.adapter_languages, cfg.d_model, cfg.adapter_dim
  down = jax.random.normal(rng, (n, cfg.num_layers, d, h)) / math.sqrt(d)
  return {"down": {"kernel": down, "bias": jnp.zeros((n, cfg.num_layers, h))},
          "up": {"kernel": jnp.zeros((n, cfg.num_layers, h, d)), "bias": jnp.zeros((n, cfg.num_layers, d))}}


def init_params(rng: jax.Array, cfg: EncoderConfig, mask_cfg: artisan.MaskConfig = artisan.MaskConfig()) -> dict:
  """Random parameters (float32) for `cfg`, with mask / adapter params when configured."""
  ks = jax.random.split(rng, 8)
  d = cfg.d_model
  params = {}
  if cfg.frontend == "logmel":
    c = cfg.subsample_dim
    params["subsample"] = {
        "conv1": {"kernel": jax.random.normal(ks[0], (3, cfg.n_mels, c)) / math.sqrt(3 * cfg.n_mels),
                  "bias": jnp.zeros((c,))},
        "conv2": {"kernel": jax.random.normal(ks[1], (3, c, d)) / math.sqrt(3 * c), "bias": jnp.zeros((d,))}}
  else:
    fe, cin = {}, 1
    for i, (c, k) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel)):
      layer = {"kernel": jax.random.normal(jax.random.fold_in(ks[0], i), (k, cin, c)) / math.sqrt(k * cin)}
      if cfg.conv_bias:
        layer["bias"] = jnp.zeros((c,))
      if cfg.feat_extract_norm == "layer" or i == 0:
        layer["norm"] = _ln(c)
      fe[f"conv{i}"] = layer
      cin = c
    params["feature_extractor"] = fe
    params["feature_projection"] = {"norm": _ln(cin), "proj": _dense_init(ks[1], cin, d)}
  params["pos_conv"] = {
      "kernel": jax.random.normal(ks[2], (cfg.pos_conv_kernel, d // cfg.pos_conv_groups, d)) /
                math.sqrt(cfg.pos_conv_kernel * d // cfg.pos_conv_groups),
      "bias": jnp.zeros((d,))}
  params["layers"] = init_layers(ks[3], cfg)
  params["ln_out"] = _ln(d)
  params["head"] = init_head(ks[4], d, cfg.vocab_size)
  if mask_cfg.kind != "none":
    params["masks"] = artisan.init_mask_params(ks[5], params["layers"], mask_cfg)
  if cfg.adapter_dim:
    params["adapters"] = init_adapters(ks[6], cfg)
  return params


def count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
