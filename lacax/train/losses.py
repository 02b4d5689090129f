"""Language-model losses for the training loop: next-token cross-entropy with loss masks.

`next_token_loss` is the masked mean over the target tokens (float32 log-softmax, whatever the logits' dtype).
`lm_loss_fn(logits_fn)` turns any `logits_fn(trainable, frozen, batch, rng) -> logits [B, T, V]` into a loss of
the `lacax.train.loop` contract (aux: `weight` = target tokens, so gradient accumulation is exact, and
`accuracy`); `llama_loss_fn(cfg)` is that for `lacax.model.llama.forward` without a KV cache. Answer-only masks
come from the data (`lacax.train.data.instruction_dataset`): the loss only reads `batch["mask"]`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from lacax.train.state import combine

LogitsFn = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array | None], jax.Array]


def _nll_and_top(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """([B, T] float32 NLL of `targets`, [B, T] bool: the target's logit is the row's maximum).

  The maximum is the one the log-sum-exp subtracts, so the top-1 test costs no second pass over the [B, T, V]
  logits (an argmax is a variadic reduction that XLA:CPU runs at a fraction of a plain max's speed)."""
  logits = logits.astype(jnp.float32)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  shift = jnp.where(jnp.isfinite(top), top, 0.0)  # as jax.nn.logsumexp: a row of -inf gives -inf, not NaN
  lse = shift + jnp.log(jnp.sum(jnp.exp(logits - shift[..., None]), axis=-1))
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return lse - picked, picked >= top


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """[B, T] float32 negative log-likelihood of `targets` [B, T] under `logits` [B, T, V]."""
  return _nll_and_top(logits, targets)[0]


def next_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(mean NLL over the masked targets, {"weight": their count, "accuracy": top-1 accuracy on them}).

  A target counts as a top-1 hit when its logit is the row's maximum (tied with another token's included).

  Args:
    logits: [B, T, V] logits of the next token at each input position.
    targets: [B, T] int32 next tokens.
    mask: [B, T] 1 where the target counts (0: padding, prompt tokens of instruction data).
  """
  mask = mask.astype(jnp.float32)
  weight = jnp.sum(mask)
  denom = jnp.maximum(weight, 1.0)
  nll, top = _nll_and_top(logits, targets)
  correct = top.astype(jnp.float32)
  return jnp.sum(nll * mask) / denom, {"weight": weight, "accuracy": jnp.sum(correct * mask) / denom}


def lm_loss_fn(logits_fn: LogitsFn) -> Callable:
  """A `lacax.train.loop` loss from a logits function (batch keys: tokens, targets, mask, positions)."""
  def loss_fn(trainable, frozen, batch, rng):
    logits = logits_fn(trainable, frozen, batch, rng)
    return next_token_loss(logits, batch["targets"], batch["mask"])

  return loss_fn


def llama_loss_fn(cfg: Any, *, params_fn: Callable[[Any, Any], Any] | None = None,
                  forward_kwargs: Callable[[Any, Any, jax.Array | None], Mapping[str, Any]] | None = None,
                  dot_dtype: str | None = None) -> Callable:
  """Next-token loss of the Llama forward without a KV cache (teacher forcing).

  Args:
    cfg: the `ModelConfig` (its dtype is the residual stream's dtype).
    params_fn: (trainable, frozen) -> the params argument of `forward` (default: `combine`, i.e. the two
      halves of one parameter pytree).
    forward_kwargs: (trainable, frozen, rng) -> extra keyword arguments of `forward` (adapters, gates, ...).
    dot_dtype: mixed precision inside the forward (`ForwardOptions.dot_dtype`, e.g. "bfloat16"): each
      projection casts its weight where it uses it, so the loss takes the float32 master weights as they are
      and their gradients come back float32. The loss then carries `compute_dtype` = dot_dtype, which tells the
      training step not to cast the parameters itself (`lacax.train.loop`).
  """
  from lacax.model import llama  # pylint: disable=g-import-not-at-top

  def logits_fn(trainable, frozen, batch, rng):
    params = (params_fn or combine)(trainable, frozen)
    kwargs = dict(forward_kwargs(trainable, frozen, rng)) if forward_kwargs is not None else {}
    if dot_dtype:
      kwargs["options"] = (kwargs.get("options") or llama.ForwardOptions()).replace(dot_dtype=dot_dtype)
    logits, _ = llama.forward(params, batch["tokens"], batch["positions"], None, cfg, **kwargs)
    return logits

  loss_fn = lm_loss_fn(logits_fn)
  if dot_dtype:
    loss_fn.compute_dtype = dot_dtype
  return loss_fn
