"""Edge-LLM adaptive layer tuning (arXiv 2406.15758; reference GATECH-EIC/Edge-LLM `utils/trainer_wrappers.py`,
`utils/bnb_wrappers.py`, `models/edge_llama_modelling.py`): tune only a window of layers at a time, with an exit
head at the top of the window, on lacax's one training loop and one forward.

Layers are cut into contiguous windows of `stride` layers; window k = [start_k, stop_k) ends at exit layer
stop_k - 1 (the reference: stride 8 on 32 layers, exits 7, 15, 23, 31). When `stride` does not divide the
depth, the last window is the shorter remainder, so the last exit is always the top layer (SmolLM2-135M, 30
layers, stride 8: windows 0-7, 8-15, 16-23, 24-29). `max_steps` is split into one contiguous phase per window
(equal lengths, the remainder to the last phase, as the reference); in phase k:

  * the prefix (layers < start_k) runs without LoRA and is cut off by `stop_gradient` at the window input, so
    autodiff keeps no activation of it and the backward covers only the window and the head;
  * the window runs with LoRA (only its rows of the stacked adapters are used and trained: row masks of
    `lacax.train.state.make_labels`); nothing above the exit is computed;
  * the loss is the next-token cross-entropy of the exit head's logits.

Exit heads (`TuningConfig.exit_head`, `exit_norm`): "copy" gives every exit its own trainable [V, D] head
initialised as a copy of the LM head (the reference); "tied" reads the frozen LM head itself (no head training,
and no per-exit [V, D] memory). `exit_norm="none"` feeds the raw residual stream to the head (the reference in
training); "final_norm" applies the model's frozen final RMSNorm first. The reference evaluates its last exit on
the *normed* state although it trained it on the raw one; lacax uses the same input in training and inference.

Inference runs two streams (`exit_logits`): a backbone stream without LoRA, and an adapted stream that is reset
to the backbone at every window boundary, so each window's LoRA sees at inference the input it was trained on.
Exit k's logits are head_k(adapted state at stop_k); `final_logits` is the model's own head on the last
adapted state (the reference's perplexity). `lacax.compress.voting` combines the exits.

Deviation from the reference (said here because it changes numbers slightly): each phase starts a fresh
optimizer state for its window (the reference's single AdamW keeps per-parameter state, but a window's
parameters never had gradients before their phase, so the moments agree; only AdamW's step counter differs,
which lacax restarts per phase as PyTorch does per parameter). The learning-rate schedule runs over all
`max_steps` (the state's step continues across phases).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lacax.model import llama
from lacax.model import lora as lora_lib
from lacax.model.config import ModelConfig
from lacax.train import losses
from lacax.train import state as st

EXIT_HEADS = ("copy", "tied")
EXIT_NORMS = ("none", "final_norm")


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Adaptive layer tuning. Frozen and hashable (static under jit).

  Attributes:
    stride: layers per window (the reference: 8).
    exit_head: "copy" (own trainable head per exit, initialised from the LM head; the reference) or "tied"
      (the frozen LM head).
    exit_norm: "none" (raw residual stream; the reference) or "final_norm" (the frozen final RMSNorm first).
    lora: the adapters (the reference: r 8, alpha 16, dropout 0.1 on every projection).
  """

  stride: int = 8
  exit_head: str = "copy"
  exit_norm: str = "none"
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig(rank=8, alpha=16.0, dropout=0.1,
                                                  targets=tuple(llama.LORA_TARGETS))

  def __post_init__(self):
    if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
      raise ValueError(f"tuning.stride={self.stride!r} must be a positive number of layers")
    if self.exit_head not in EXIT_HEADS:
      raise ValueError(f"tuning.exit_head={self.exit_head!r} is not supported; expected one of {EXIT_HEADS}")
    if self.exit_norm not in EXIT_NORMS:
      raise ValueError(f"tuning.exit_norm={self.exit_norm!r} is not supported; expected one of {EXIT_NORMS}")


def windows(num_layers: int, stride: int) -> tuple[tuple[int, int], ...]:
  """The contiguous windows [start, stop) of `stride` layers; the last one takes the remainder."""
  if stride < 1 or num_layers < 1:
    raise ValueError(f"windows need num_layers >= 1 and stride >= 1 (got {num_layers}, {stride})")
  starts = list(range(0, num_layers, stride))
  return tuple((s, min(s + stride, num_layers)) for s in starts)


def exit_layers(num_layers: int, stride: int) -> tuple[int, ...]:
  """0-based index of each exit layer (the top of each window): 7, 15, 23, 31 for 32 layers, stride 8."""
  return tuple(stop - 1 for _, stop in windows(num_layers, stride))


def phase_schedule(max_steps: int, num_phases: int) -> tuple[tuple[int, int], ...]:
  """Contiguous phases [begin, end) of max_steps // num_phases steps each; the remainder goes to the last."""
  if max_steps < num_phases or num_phases < 1:
    raise ValueError(f"tuning.max_steps={max_steps} must be >= the number of phases ({num_phases}): every "
                     "window needs at least one step")
  length = max_steps // num_phases
  bounds = [k * length for k in range(num_phases)] + [max_steps]
  return tuple((bounds[k], bounds[k + 1]) for k in range(num_phases))


def _lm_head(params: llama.Params, cfg: ModelConfig) -> Any:
  return params["embed"] if cfg.tie_word_embeddings else params["lm_head"]


def _dense(w: Any) -> jax.Array:
  return w.dense() if isinstance(w, llama.ProjectedWeight) else w


def init_tree(params: llama.Params, cfg: ModelConfig, tcfg: TuningConfig, key: jax.Array) -> dict[str, Any]:
  """The pytree adaptive layer tuning trains: {"params": base (frozen), "lora": adapters of every layer,
  "heads": one [V, D] copy of the LM head per exit ("copy"; absent with "tied")}."""
  if isinstance(params["layers"], (list, tuple)):
    raise ValueError("adaptive layer tuning needs homogeneous stacked layers (params['layers'] is a list of "
                     "segments)")
  tree = {"params": params, "lora": lora_lib.init_lora(tcfg.lora, params, key)}
  if tcfg.exit_head == "copy":
    head = jnp.asarray(_dense(_lm_head(params, cfg)), jnp.float32)
    tree["heads"] = [jnp.array(head, copy=True) for _ in windows(cfg.num_layers, tcfg.stride)]
  return tree


def phase_labels(tree: Mapping[str, Any], cfg: ModelConfig, tcfg: TuningConfig, phase: int) -> Any:
  """Labels of phase `phase`: the window's rows of every adapter and (with "copy") the phase's exit head
  train; the base model and every other head are frozen."""
  start, stop = windows(cfg.num_layers, tcfg.stride)[phase]
  labels = st.make_labels({"lora": tree["lora"]}, ("^lora/",), layer_window=(start, stop), layers_key="lora")
  out = {"params": jax.tree.map(lambda _: False, tree["params"]), "lora": labels["lora"]}
  if "heads" in tree:
    out["heads"] = [k == phase for k in range(len(tree["heads"]))]
  return out


def backbone_hidden(params: llama.Params, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig,
                    at: Sequence[int]) -> jax.Array:
  """[len(at), B, T, D] residual stream of the plain model (no LoRA) after `at` layers (0 = embeddings);
  only the layers below max(at) run."""
  top = max(at)
  if top == 0:
    x = llama.embed_tokens(params["embed"], tokens, cfg.jnp_dtype)
    return jnp.stack([x for _ in at])
  opts = llama.ForwardOptions(layers=tuple(range(top)), hidden_layers=tuple(at), logits=False)
  return llama.run(params, tokens, positions, None, cfg, options=opts).hidden


def run_window(params: llama.Params, lora: Any, lora_cfg: lora_lib.LoraConfig | None, hidden_in: jax.Array,
               positions: jax.Array, cfg: ModelConfig, start: int, stop: int,
               rng: jax.Array | None = None) -> jax.Array:
  """The residual stream after layers [start, stop) run from `hidden_in` [B, T, D] (with LoRA when given).

  The one forward starts from an embedding gather; feeding it a table whose row b * T + t is hidden_in[b, t]
  and token ids b * T + t makes that gather the identity on the window's input, so the window runs through
  `llama.run` itself (its `layers` option: only layers start..stop-1 are computed, none above)."""
  B, T, D = hidden_in.shape
  table = {**params, "embed": hidden_in.reshape(B * T, D)}
  ids = jnp.arange(B * T, dtype=jnp.int32).reshape(B, T)
  opts = llama.ForwardOptions(layers=tuple(range(start, stop)), hidden_layers=(stop,), logits=False)
  if lora is not None:
    opts = lora_lib.options(lora_cfg, lora, rng, base=opts)
  return llama.run(table, ids, positions, None, cfg, options=opts).hidden[0]


def head_logits(tree: Mapping[str, Any], hidden: jax.Array, cfg: ModelConfig, tcfg: TuningConfig,
                exit_index: int) -> jax.Array:
  """[B, T, V] float32 logits of exit `exit_index` on residual states `hidden` [B, T, D]."""
  params = tree["params"]
  x = hidden
  if tcfg.exit_norm == "final_norm":
    x = llama.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  head = tree["heads"][exit_index] if tcfg.exit_head == "copy" else _lm_head(params, cfg)
  if not isinstance(head, llama.ProjectedWeight):
    head = head.astype(x.dtype)
  return llama.project(x, head, "btd,vd->btv", preferred_element_type=jnp.float32)


def window_logits(tree: Mapping[str, Any], tokens: jax.Array, positions: jax.Array, cfg: ModelConfig,
                  tcfg: TuningConfig, phase: int, rng: jax.Array | None = None) -> jax.Array:
  """Phase `phase`'s training logits: the prefix without LoRA (stop_gradient at the window input), the
  window with LoRA, the exit head. Nothing above the exit runs."""
  start, stop = windows(cfg.num_layers, tcfg.stride)[phase]
  params = tree["params"]
  h = jax.lax.stop_gradient(backbone_hidden(params, tokens, positions, cfg, (start,))[0])
  h = run_window(params, tree["lora"], tcfg.lora, h, positions, cfg, start, stop, rng)
  return head_logits(tree, h, cfg, tcfg, phase)


def phase_loss_fn(cfg: ModelConfig, tcfg: TuningConfig, phase: int) -> Callable:
  """The `lacax.train.loop` loss of phase `phase` (batch: tokens, targets, mask, positions)."""
  def logits_fn(trainable, frozen, batch, rng):
    return window_logits(st.combine(trainable, frozen), batch["tokens"], batch["positions"], cfg, tcfg, phase,
                         rng)

  return losses.lm_loss_fn(logits_fn)


def exit_logits(tree: Mapping[str, Any], tokens: jax.Array, positions: jax.Array, cfg: ModelConfig,
                tcfg: TuningConfig) -> tuple[jax.Array, jax.Array]:
  """Two-stream inference: ([E, B, T, V] logits of every exit, [B, T, V] the LM head on the last adapted
  state). The adapted stream is reset to the backbone stream at every window boundary."""
  params = tree["params"]
  wins = windows(cfg.num_layers, tcfg.stride)
  starts = tuple(s for s, _ in wins)
  backbone = backbone_hidden(params, tokens, positions, cfg, starts)
  exits, adapted = [], None
  for k, (start, stop) in enumerate(wins):
    adapted = run_window(params, tree["lora"], tcfg.lora, backbone[k], positions, cfg, start, stop)
    exits.append(head_logits(tree, adapted, cfg, tcfg, k))
  return jnp.stack(exits), llama.unembed(params, adapted, cfg)


@dataclasses.dataclass(frozen=True)
class TuneResult:
  """What `tune` returns: the tuned tree and the per-phase records of the loop."""

  tree: Any
  phases: tuple[tuple[int, int], ...]
  records: list[dict[str, Any]]


def tune(params: llama.Params, cfg: ModelConfig, tcfg: TuningConfig, batch_at: Callable[[int], Any], *,
         max_steps: int, optimizer: Any, schedule: Callable | None = None, train_config: Any = None,
         seed: int = 0, run_dir: str | None = None, checkpoint_dir: str | None = None,
         tree: Any = None) -> TuneResult:
  """Adaptive layer tuning on `lacax.train.Trainer`: one phase per window, the state's step continuing.

  Args:
    params, cfg: the (compressed) model.
    tcfg: the tuning config.
    batch_at: step -> batch (tokens, targets, mask, positions); a pure function of the step.
    max_steps: optimizer steps over all phases.
    optimizer, schedule: from `lacax.train.make_optimizer(..., max_steps)`.
    train_config: a `lacax.train.TrainConfig` (its `steps` is replaced by each phase's end).
    seed: seeds the adapters and the loop's PRNG.
    run_dir: metrics of phase k go to run_dir/phase_k (None: nowhere).
    checkpoint_dir: checkpoints of phase k in checkpoint_dir/phase_k; a rerun resumes (None: no resume).
    tree: a tree from `init_tree` to start from (default: a fresh one).
  """
  from lacax.train import loop  # pylint: disable=g-import-not-at-top

  train_config = train_config or loop.TrainConfig(steps=max_steps, progress=False)
  tree = tree if tree is not None else init_tree(params, cfg, tcfg, jax.random.PRNGKey(seed))
  wins = windows(cfg.num_layers, tcfg.stride)
  phases = phase_schedule(max_steps, len(wins))
  records = []
  for k, (begin, end) in enumerate(phases):
    labels = phase_labels(tree, cfg, tcfg, k)
    state = st.create_train_state(tree, optimizer, labels=labels, seed=seed)
    state = state.replace(step=jnp.asarray(begin, jnp.int32))
    trainer = loop.Trainer(phase_loss_fn(cfg, tcfg, k), optimizer, dataclasses.replace(train_config, steps=end),
                           schedule=schedule, labels=labels)
    sub = lambda d: None if d is None else os.path.join(d, f"phase_{k}")  # noqa: E731
    if run_dir:
      os.makedirs(sub(run_dir), exist_ok=True)
    state, recs = trainer.fit(state, batch_at, run_dir=sub(run_dir), checkpoint_dir=sub(checkpoint_dir))
    records.extend({**r, "phase": k} for r in recs)
    tree = state.params
  return TuneResult(tree=tree, phases=phases, records=records)


def compiled_step_memory(cfg: ModelConfig, tcfg: TuningConfig, tree: Any, batch: Any, phase: int | None,
                         *, full: str | None = None) -> dict[str, int]:
  """Compiled memory of one gradient step (XLA's memory analysis of the lowered, compiled value_and_grad).

  Args:
    phase: the window phase (adaptive layer tuning); None with `full`.
    full: "lora" (LoRA through all layers, the plain forward) or "full" (every weight trains), for the
      baselines of the paper's comparison.

  Returns:
    {"temp_bytes", "argument_bytes", "output_bytes", "trainable_params"}.
  """
  if phase is not None:
    labels = phase_labels(tree, cfg, tcfg, phase)
    loss_fn = phase_loss_fn(cfg, tcfg, phase)
    params = tree
  elif full == "lora":
    params = {"params": tree["params"], "lora": tree["lora"]}
    labels = {"params": jax.tree.map(lambda _: False, tree["params"]), "lora": jax.tree.map(lambda _: True,
                                                                                             tree["lora"])}
    lcfg = tcfg.lora

    def loss_fn(trainable, frozen, b, rng):
      p = st.combine(trainable, frozen)
      logits, _ = llama.forward(p["params"], b["tokens"], b["positions"], None, cfg,
                                options=lora_lib.options(lcfg, p["lora"], rng))
      return losses.next_token_loss(logits, b["targets"], b["mask"])
  elif full == "full":
    params = tree["params"]
    labels = jax.tree.map(lambda _: True, params)
    loss_fn = losses.llama_loss_fn(cfg)
  else:
    raise ValueError(f"compiled_step_memory needs a phase or full in ('lora', 'full'); got {phase!r}, {full!r}")
  trainable, frozen = st.partition(params, labels)

  def grad(tr, fr, b, rng):
    return jax.value_and_grad(lambda t: loss_fn(t, fr, b, rng)[0])(tr)

  compiled = jax.jit(grad).lower(trainable, frozen, batch, jax.random.PRNGKey(0)).compile()
  mem = compiled.memory_analysis()
  return {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes), "trainable_params": st.count_params(trainable)}


def lora_params_in_window(tree: Any, cfg: ModelConfig, tcfg: TuningConfig, phase: int) -> int:
  """Adapter scalars that train in phase `phase` (the window's rows), plus its head's with "copy"."""
  start, stop = windows(cfg.num_layers, tcfg.stride)[phase]
  n = sum(int(np.prod(x.shape[1:])) * (stop - start) for x in jax.tree_util.tree_leaves(tree["lora"]))
  if "heads" in tree:
    n += int(np.prod(tree["heads"][phase].shape))
  return n
