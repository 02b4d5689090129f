"""Sharding: logical-axis rules, and sharded forward / streaming / generation equal to one device on 8 CPU devices.

The 8-device checks run in a child process (`python -m tests.test_sharding <report.json>`), because the number of
fake CPU devices is fixed when JAX's backend starts and other test modules of the same pytest process start it
with one device. The child runs every check, records pass / fail with the traceback in a JSON report, and the
parent's test methods (one per check) assert on the report, so a failure names its check and shows its error.

Model dims divide every mesh of the matrix (8,1), (4,2), (2,4), (1,8): 16 query heads, 8 kv heads, MLP 64,
vocab 128, width 32, batch 8. The meshes alternate between ("data", "tensor") and ("fsdp", "tensor") axes, so
data parallelism, FSDP (parameters split on `embed`, batch split over fsdp) and tensor parallelism are covered.

Every check also reads the compiled program (a compilation-cache hit of the one that ran): inputs and outputs laid
out as the rules say (sharded, not replicated), and no cache array moved between devices (HLO collectives with a
slot axis). KVMerger is the one exception checked more loosely: its planner's segment reductions over flattened
(layer, row, head, run) ids make XLA all-gather its [L, B, S, KV] plan arrays; its keys and values stay local.
The policies are every registered one (`tests/cache_policies.py`), so a new registry entry is checked here too:
a few on all four meshes, the rest on the one that splits rows and kv heads (`meshes_for`).
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

if __name__ == "__main__":  # the child: 8 fake devices, set before JAX starts
  # Unoptimised CPU code compiles in about half the time; sharded and single-device runs share the flags.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                             " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest, parameterized  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lacax import sharding as sh  # noqa: E402
from lacax.model import config as config_lib  # noqa: E402
from lacax.model import llama  # noqa: E402
from tests import cache_policies  # noqa: E402

MESHES = (((8, 1), ("data", "tensor")), ((4, 2), ("fsdp", "tensor")), ((2, 4), ("data", "tensor")),
          ((1, 8), ("fsdp", "tensor")))
# Every registered policy (tests/cache_policies.py): streamed if it compacts in decode, generated (prefill
# hand-off + decode) if it compresses the prompt or has a one-shot set-up.
STREAM_POLICIES = cache_policies.streaming_names()
PREFILL_POLICIES = cache_policies.prefill_names()
BATCH = 8
STREAM_TOKENS = 41  # 40 streamed steps in two chunks of 20: the second call reuses the compiled chunk
CHUNK = 20
PROMPT_LENGTHS = (30, 25, 33, 18, 40, 29, 36, 22)
MAX_NEW = 6


def tiny_cfg() -> config_lib.ModelConfig:
  return config_lib.ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=16,
                                num_kv_heads=8, head_dim=8)


def mesh_name(shape, axes) -> str:
  return "x".join(f"{a}{s}" for s, a in zip(shape, axes))


def make_policy(name: str):
  """The registered policy `name` at budget 16 (tiny model: 4 layers, so the ladder's span is 2)."""
  return cache_policies.tiny_policy(name, max_new_tokens=MAX_NEW, cfg=tiny_cfg())


# The policies checked on all four meshes; every other one runs on the mesh that splits both rows and kv heads
# ("data2xtensor4"), which exercises every axis a policy's scores or selections could mix. LaCache is the main
# system; AdaKV's one top-k spans a layer's kv heads (CriticalAdaKV runs the same top-k on other scores); H2O
# accumulates scores across decode steps; the full cache is the forward's own layout. LACAX_SHARDING_ALL_MESHES=1
# checks every policy on every mesh (the sweep to run when lacax/sharding.py or a compaction changes: about 20
# minutes on two cores).
ALL_MESH_POLICIES = ("full", "lacache", "h2o", "adakv")
_SPLITS_BOTH = "data2xtensor4"


def meshes_for(policy_name: str):
  """The meshes a policy is checked on (above). Sharding annotations never change what a program computes, so a
  second mesh adds little but the time to compile for it (each check compiles prefill and decode twice, ~9 s on
  two cores); the one that splits both rows and kv heads is where a layout bug in a reduction shows."""
  if policy_name in ALL_MESH_POLICIES or os.environ.get("LACAX_SHARDING_ALL_MESHES") == "1":
    return MESHES
  return tuple(m for m in MESHES if mesh_name(*m) == _SPLITS_BOTH)


def check_names() -> list[str]:
  names = [f"forward_{mesh_name(*m)}" for m in MESHES]
  names += [f"stream_{p}_{mesh_name(*m)}" for p in STREAM_POLICIES for m in meshes_for(p)]
  names += [f"generate_{p}_{mesh_name(*m)}" for p in PREFILL_POLICIES for m in meshes_for(p)]
  names += ["sharded_loading"]
  return names


# ----------------------------------------------------------------------------------------------------------------
# The child's checks (8 devices).
# ----------------------------------------------------------------------------------------------------------------


class _Child:
  """Shared model, inputs and single-device references for the checks."""

  def __init__(self):
    assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"
    self.cfg = tiny_cfg()
    self.params = llama.init_params(self.cfg, jax.random.PRNGKey(0), std=0.1)
    rng = np.random.RandomState(0)
    self.stream_tokens = rng.randint(0, self.cfg.vocab_size, (BATCH, STREAM_TOKENS)).astype(np.int32)
    self.prompts = [rng.randint(1, self.cfg.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    self.mesh_rules = {mesh_name(*m): sh.MeshRules(sh.make_mesh(*m)) for m in MESHES}
    self._refs = {}

  def reference(self, key, fn):
    if key not in self._refs:
      self._refs[key] = fn()
    return self._refs[key]


def assert_laid_out(actual, mesh_rules: sh.MeshRules, axes_of, tree, what: str) -> None:
  """Every array of `actual` (shardings) is laid out as the rules place `tree`, and sharded where they shard."""
  flat_actual = jax.tree_util.tree_leaves(actual, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  flat_tree = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert len(flat_actual) == len(flat_tree), (what, len(flat_actual), len(flat_tree))
  for sharding, (path, leaf) in zip(flat_actual, flat_tree):
    axes = axes_of(path, leaf)
    if axes is None:
      continue
    expected = mesh_rules.sharding(axes, leaf.shape)
    name = f"{what}{jax.tree_util.keystr(path)}"
    assert sharding.is_equivalent_to(expected, len(leaf.shape)), f"{name}: {sharding.spec} != {expected.spec}"
    if any(entry is not None for entry in expected.spec):
      assert not sharding.is_fully_replicated, f"{name} is replicated, the rules shard it as {expected.spec}"


def _param_axes(path, leaf):
  del leaf
  return sh.param_axes(path)


def _cache_axes(path, leaf):
  return None if sh._key_name(path[0]) == "state" else sh.cache_axes(path, leaf)  # pylint: disable=protected-access


_FORWARD = jax.jit(llama.forward, static_argnames="cfg")


def check_forward(ctx: _Child, name: str) -> None:
  from lacax.cache.kv_cache import init_cache  # pylint: disable=g-import-not-at-top

  mr = ctx.mesh_rules[name]
  cfg, tokens = ctx.cfg, ctx.stream_tokens[:, :12]
  positions = np.tile(np.arange(12, dtype=np.int32), (BATCH, 1))
  positions[3, 9:] = -1  # a padded row
  forward = _FORWARD
  ref_logits, ref_cache = ctx.reference("forward", lambda: forward(ctx.params, tokens, positions,
                                                                   init_cache(cfg, BATCH, 16), cfg=cfg))
  params = mr.shard_params(ctx.params)
  cache = init_cache(cfg, BATCH, 16, mesh_rules=mr)
  assert_laid_out(mr.cache_shardings(cache), mr, _cache_axes, cache, "cache placed by init_cache")
  assert_laid_out(jax.tree.map(lambda x: x.sharding, params), mr, _param_axes, params, "params")
  tokens_in = mr.put(tokens, ("batch", None))
  positions_in = mr.put(positions, ("batch", None))
  compiled = forward.lower(params, tokens_in, positions_in, cache, cfg=cfg).compile()
  assert_laid_out(compiled.input_shardings[0][0], mr, _param_axes, params, "compiled params")
  assert_laid_out(compiled.input_shardings[0][3], mr, _cache_axes, cache, "compiled cache in")
  logits, out_cache = compiled(params, tokens_in, positions_in, cache)
  # The batch is split over the data axes all the way to the logits.
  batch_spec = mr.spec(("batch", None, None), logits.shape)[0]
  assert compiled.output_shardings[0].spec[0] == batch_spec, (compiled.output_shardings[0].spec, batch_spec)
  assert_laid_out(compiled.output_shardings[1], mr, _cache_axes, out_cache, "compiled cache out")
  assert_laid_out(jax.tree.map(lambda x: x.sharding, out_cache), mr, _cache_axes, out_cache, "cache out")
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out_cache.k), np.asarray(ref_cache.k), atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out_cache.pos), np.asarray(ref_cache.pos))
  np.testing.assert_array_equal(np.asarray(out_cache.length), np.asarray(ref_cache.length))


def collectives_with_slots(hlo: str, slots: int, min_elements: int, last_dim: int | None = None) -> list[str]:
  """Cross-device data movement (all-gather, all-to-all, collective-permute) in `hlo` whose result carries a
  dimension of `slots` and at least `min_elements` elements (and, with `last_dim`, is a float [L, B, S, KV, D]):
  a cache array (or a slice of one) being moved."""
  found = []
  for line in hlo.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    dims = [int(d) for d in match.group(2).split(",") if d]
    is_keys_or_values = len(dims) == 5 and dims[-1] == last_dim and match.group(1).startswith(("f", "bf"))
    if last_dim is not None and not is_keys_or_values:
      continue
    if slots in dims and int(np.prod(dims)) >= min_elements:
      found.append(line.strip()[:160])
  return found


_COLLECTIVE = re.compile(r"= \(?([a-z0-9]+)\[([0-9,]*)\][^=]*?\b(all-gather|all-to-all|collective-permute)(-start)?\(")


def assert_cache_stays_local(hlo: str, mesh_rules: sh.MeshRules, cache, what: str, *, keys_values_only=False):
  """No cache array is gathered: nothing with a slot axis as large as one device's block of `pos` (or, with
  `keys_values_only`, of `k`) crosses devices. Parameters may be all-gathered (FSDP); they have no slot axis."""
  field = "k" if keys_values_only else "pos"
  block = mesh_rules.shard_shape(sh.CACHE_AXES[field], getattr(cache, field).shape)
  moved = collectives_with_slots(hlo, cache.capacity, int(np.prod(block)),
                                 cache.k.shape[-1] if keys_values_only else None)
  assert not moved, f"{what}: cache arrays move between devices:\n" + "\n".join(moved)


def check_stream(ctx: _Child, policy_name: str, name: str) -> None:
  from lacax.eval import perplexity  # pylint: disable=g-import-not-at-top

  mr, cfg, policy = ctx.mesh_rules[name], ctx.cfg, make_policy(policy_name)
  ref = ctx.reference(("stream", policy_name), lambda: perplexity.streaming_nll(
      ctx.params, cfg, ctx.stream_tokens, policy, chunk=CHUNK))
  params = mr.shard_params(ctx.params)
  result = perplexity.streaming_nll(params, cfg, ctx.stream_tokens, policy, chunk=CHUNK, mesh_rules=mr)
  fresh = mr.create_cache(lambda: policy.init(cfg, BATCH, policy.decode_capacity(cfg, STREAM_TOKENS - 1)))
  assert_laid_out(jax.tree.map(lambda x: x.sharding, result.cache), mr, _cache_axes, result.cache, "cache")
  np.testing.assert_allclose(result.nll, ref.nll, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(result.cache.pos), np.asarray(ref.cache.pos))  # same kept positions
  np.testing.assert_array_equal(np.asarray(result.cache.length), np.asarray(ref.cache.length))
  np.testing.assert_allclose(np.asarray(result.cache.k), np.asarray(ref.cache.k), atol=2e-5, rtol=1e-5)
  # The program `streaming_nll` ran (same arguments: a compilation-cache hit) never gathers the cache.
  feed = ctx.stream_tokens[:, :CHUNK]
  compiled = perplexity.stream_chunk.lower(params, fresh, feed, feed, feed, cfg=cfg, policy=policy).compile()
  assert_laid_out(compiled.input_shardings[0][0], mr, _param_axes, params, "compiled params")
  assert_cache_stays_local(compiled.as_text(), mr, fresh, "streaming step")


def _generation(params, cfg, prompts, policy, mesh_rules):
  """prefill + decode as `generate` runs them: (prefilled cache shardings, pos, rules), final state, HLO."""
  from lacax import generate as generation  # pylint: disable=g-import-not-at-top
  from lacax.sampling import SamplingConfig  # pylint: disable=g-import-not-at-top

  tokens, lengths = generation.pad_prompts(prompts, bucket=8)
  statics = dict(cfg=cfg, policy=policy, sampling=SamplingConfig(), max_new_tokens=MAX_NEW, stop_ids=())
  decode_statics = dict(statics, pad_id=0)  # as `generate` passes them, so that its calls hit the same programs
  decode_capacity = policy.decode_capacity(cfg, int(lengths.max()) + MAX_NEW)
  tokens_in, lengths_in, rng = jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0)
  if mesh_rules is not None:
    tokens_in, lengths_in = mesh_rules.put(tokens, ("batch", None)), mesh_rules.put(lengths, ("batch",))
    rng = mesh_rules.put(np.asarray(rng), (None,))
  args = (params, tokens_in, lengths_in, rng)
  state = generation.prefill(*args, decode_capacity=decode_capacity, mesh_rules=mesh_rules, **statics)
  hlo = ""
  if mesh_rules is not None:  # compilation-cache hits: the programs that just ran
    hlo = generation.prefill.lower(*args, decode_capacity=decode_capacity, mesh_rules=mesh_rules,
                                   **statics).compile().as_text()
    hlo += generation.decode.lower(params, state, **decode_statics).compile().as_text()
  # Read the prefilled cache before `decode` donates it.
  prefilled = (jax.tree.map(lambda x: x.sharding, state.cache), np.asarray(state.cache.pos), state.cache.mesh_rules)
  return prefilled, generation.decode(params, state, **decode_statics), hlo


def check_generate(ctx: _Child, policy_name: str, name: str) -> None:
  from lacax import generate as generation  # pylint: disable=g-import-not-at-top

  mr, cfg, policy = ctx.mesh_rules[name], ctx.cfg, make_policy(policy_name)
  ref_prefilled, ref, _ = ctx.reference(("generate", policy_name), lambda: _generation(
      ctx.params, cfg, ctx.prompts, policy, None))
  params = mr.shard_params(ctx.params)
  prefilled, state, hlo = _generation(params, cfg, ctx.prompts, policy, mr)
  prefilled_shardings, prefilled_pos, prefilled_rules = prefilled
  assert prefilled_rules == mr and state.cache.mesh_rules == mr, "the cache lost its mesh rules"
  assert_laid_out(prefilled_shardings, mr, _cache_axes, state.cache, "prefilled cache")
  assert_laid_out(jax.tree.map(lambda x: x.sharding, state.cache), mr, _cache_axes, state.cache, "decoded cache")
  # The compaction after the prefill kept the same positions, and so did every decode step.
  np.testing.assert_array_equal(prefilled_pos, ref_prefilled[1])
  np.testing.assert_array_equal(np.asarray(state.cache.pos), np.asarray(ref.cache.pos))
  np.testing.assert_array_equal(np.asarray(state.out), np.asarray(ref.out))
  np.testing.assert_allclose(np.asarray(state.cache.k), np.asarray(ref.cache.k), atol=2e-5, rtol=1e-5)
  # KVMerger's planner runs segment reductions over flattened (layer, row, head, run) ids, which XLA can only
  # partition by gathering its [L, B, S, KV] plan arrays; AdaKV's (and CriticalAdaKV's) one top-k across a
  # layer's kv heads (its head-adaptive budget) gathers its [L, B, S, KV] scores and keep mask over the tensor
  # axis, and so does KVzip's one ranking over a row's layers and kv heads. In all, the keys and values stay
  # local (see the report).
  assert_cache_stays_local(hlo, mr, state.cache, "prefill + decode",
                           keys_values_only=policy_name in ("kvmerger", "adakv", "criticaladakv", "kvzip"))
  # The public entry point with the rules gives the same tokens (the same compiled programs).
  result = generation.generate(params, cfg, ctx.prompts, max_new_tokens=MAX_NEW, policy=policy, bucket=8,
                               mesh_rules=mr)
  expected = [row[:MAX_NEW] for row in np.asarray(ref.out).tolist()]
  assert result.tokens == expected, (result.tokens, expected)


def write_hf_checkpoint(cfg: config_lib.ModelConfig, directory: str, seed: int = 0) -> str:
  """A random Hugging Face-layout checkpoint of `cfg` (two safetensors shards + index), without torch."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from lacax.weights import hf  # pylint: disable=g-import-not-at-top

  rng = np.random.RandomState(seed)
  tensors = {}
  for _, template, shape, _ in hf.hf_tensor_map(cfg):
    for i in range(cfg.num_layers if "{i}" in template else 1):
      tensors[template.format(i=i)] = rng.randn(*shape).astype(np.float32)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for file, members in shards.items():
    save_file({n: tensors[n] for n in members}, os.path.join(directory, file))
    weight_map.update({n: file for n in members})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
               "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
               "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
               "head_dim": cfg.head_dim, "tie_word_embeddings": False}, f)
  return directory


def check_sharded_loading(ctx: _Child) -> None:
  """A Hugging Face checkpoint loads straight into shards, equal to the single-device load; every transfer to a
  device is that device's block, never a whole parameter. An orbax checkpoint restores into the same shards."""
  from lacax.weights import loader  # pylint: disable=g-import-not-at-top

  mr = ctx.mesh_rules["fsdp4xtensor2"]
  with tempfile.TemporaryDirectory() as tmp:
    path = write_hf_checkpoint(ctx.cfg, tmp)
    reference = loader.load_model(path)
    sent = []
    original = jax.device_put

    def spy(x, device=None, *args, **kwargs):
      sent.append(np.shape(x))
      return original(x, device, *args, **kwargs)

    jax.device_put = spy
    try:
      model = loader.load_model(path, mesh_rules=mr)
    finally:
      jax.device_put = original
  assert_laid_out(jax.tree.map(lambda x: x.sharding, model.params), mr, _param_axes, model.params, "loaded")
  for got, want in zip(jax.tree.leaves(model.params), jax.tree.leaves(reference.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  blocks = {mr.shard_shape(sh.param_axes(p), x.shape) for p, x in jax.tree_util.tree_flatten_with_path(model.params)[0]}
  assert sent and all(tuple(shape) in blocks for shape in sent), (sent, blocks)
  assert model.fingerprint() == reference.fingerprint()
  # An orbax checkpoint restores straight into the shards the rules give.
  from lacax.weights import checkpoint  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    path = checkpoint.save_params(os.path.join(tmp, "ckpt"), reference.params, reference.cfg)
    restored = checkpoint.restore_params(path, target=mr.abstract_params(llama.param_shapes(reference.cfg)))
  assert_laid_out(jax.tree.map(lambda x: x.sharding, restored), mr, _param_axes, restored, "restored")
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(reference.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def group_names(group: str) -> list[str]:
  """The checks of one child: "generate" (the prefill + decode checks of every policy) or "other" (forward,
  streaming, sharded loading). Two children, so that two pytest workers run them side by side."""
  if group not in ("generate", "other"):
    return []
  return [n for n in check_names() if n.startswith("generate_") == (group == "generate")]


def run_child(report_path: str, only: str = "") -> int:
  """Runs every check (or those of the group `only`, or whose name contains it), writes
  {name: {"ok", "error", "seconds"}} to `report_path`; exit status 1 on failure."""
  report = {}
  start = time.perf_counter()
  try:
    ctx = _Child()
  except Exception:  # pylint: disable=broad-except
    error = traceback.format_exc()
    report = {name: {"ok": False, "error": "set-up failed:\n" + error, "seconds": 0.0} for name in check_names()}
    ctx = None
  if ctx is not None:
    for name in check_names():
      if only and name not in group_names(only) and only not in name:
        continue
      kind, _, rest = name.partition("_")
      t0 = time.perf_counter()
      try:
        if kind == "forward":
          check_forward(ctx, rest)
        elif kind in ("stream", "generate"):
          policy_name, _, mesh = rest.partition("_")
          (check_stream if kind == "stream" else check_generate)(ctx, policy_name, mesh)
        elif name == "sharded_loading":
          check_sharded_loading(ctx)
        report[name] = {"ok": True, "error": "", "seconds": time.perf_counter() - t0}
      except Exception:  # pylint: disable=broad-except
        report[name] = {"ok": False, "error": traceback.format_exc(), "seconds": time.perf_counter() - t0}
      # One check's programs are not reused by the next policy's: dropping them keeps the child's memory flat
      # (it ran out of memory compiling, ~45 checks in, on a loaded 24 GB machine).
      jax.clear_caches()
      gc.collect()
      print(f"{name}: {'ok' if report[name]['ok'] else 'FAILED'} ({report[name]['seconds']:.1f}s)", flush=True)
  print(f"total {time.perf_counter() - start:.1f}s", flush=True)
  with open(report_path, "w") as f:
    json.dump(report, f, indent=1)
  return 0 if all(r["ok"] for r in report.values()) else 1


# ----------------------------------------------------------------------------------------------------------------
# The parent's tests.
# ----------------------------------------------------------------------------------------------------------------

_CHILD_TIMEOUT_S = 1500
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _EightDeviceChild:
  """Runs one group of child checks once per class (`GROUP`), and one test per check reads its report."""

  GROUP = ""
  report: dict = {}
  child_output = ""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "report.json")
      env = dict(os.environ)
      env.pop("XLA_FLAGS", None)
      try:
        proc = subprocess.run([sys.executable, "-m", "tests.test_sharding", path, cls.GROUP], cwd=_REPO, env=env,
                              capture_output=True, text=True, timeout=_CHILD_TIMEOUT_S)
        cls.child_output = proc.stdout[-4000:] + proc.stderr[-4000:]
      except subprocess.TimeoutExpired as e:
        cls.child_output = f"child timed out after {_CHILD_TIMEOUT_S}s: {e.stdout!r}"
      cls.report = {}
      if os.path.isfile(path):
        with open(path) as f:
          cls.report = json.load(f)

  def check(self, name):
    if name not in self.report:
      self.fail(f"the 8-device child reported nothing for {name}:\n{self.child_output}")
    entry = self.report[name]
    self.assertTrue(entry["ok"], f"{name} failed on 8 devices:\n{entry['error']}")


class EightDeviceTest(_EightDeviceChild, parameterized.TestCase):
  """Forward, streaming and sharded loading on 8 fake devices (one child process)."""

  GROUP = "other"

  @parameterized.named_parameters((name, name) for name in group_names("other"))
  def test_check(self, name):
    self.check(name)


class EightDeviceGenerateTest(_EightDeviceChild, parameterized.TestCase):
  """Prefill + decode of every registered policy on 8 fake devices (a second child, beside the first)."""

  GROUP = "generate"

  @parameterized.named_parameters((name, name) for name in group_names("generate"))
  def test_check(self, name):
    self.check(name)


class RulesTest(parameterized.TestCase):
  """Rules, specs and the fallback, on abstract meshes (no devices needed)."""

  def test_default_layouts_of_llama3_8b_on_v5e8(self):
    cfg = config_lib.LLAMA3_8B
    tp = sh.MeshRules(sh.abstract_mesh((1, 1, 8)))
    self.assertEqual(tp.spec(sh.LAYER_PARAM_AXES["wq"], (32, 4096, 32, 128)), jax.P(None, None, "tensor", None))
    self.assertEqual(tp.spec(sh.CACHE_AXES["k"], (32, 1, 32768, 8, 128)), jax.P(None, None, None, "tensor", None))
    fsdp = sh.MeshRules(sh.abstract_mesh((1, 8, 1)))
    self.assertEqual(fsdp.spec(sh.LAYER_PARAM_AXES["w_down"], (32, 14336, 4096)), jax.P(None, None, "fsdp"))
    # Batch 1 cannot split: the cache is replicated over fsdp; batch 8 splits.
    self.assertEqual(fsdp.spec(sh.CACHE_AXES["k"], (32, 1, 32768, 8, 128)), jax.P(None, None, None, None, None))
    self.assertEqual(fsdp.spec(sh.CACHE_AXES["k"], (32, 8, 32768, 8, 128)), jax.P(None, "fsdp", None, None, None))
    from lacax.model import llama  # pylint: disable=g-import-not-at-top

    bytes_tp = tp.param_bytes(llama.param_shapes(cfg))
    self.assertAlmostEqual(bytes_tp / (2 * cfg.num_params() / 8), 1.0, delta=1e-3)  # everything splits 8 ways

  def test_fallback_keeps_the_longest_dividing_prefix(self):
    mr = sh.MeshRules(sh.abstract_mesh((2, 4, 2)))
    self.assertEqual(mr.spec(("batch",), (16,)), jax.P(("data", "fsdp")))
    self.assertEqual(mr.spec(("batch",), (4,)), jax.P("data"))  # 2 divides, 2 * 4 does not
    self.assertEqual(mr.spec(("batch",), (3,)), jax.P(None))
    self.assertEqual(mr.shard_shape(("batch", "kv_heads"), (4, 3)), (2, 3))
    # A mesh axis is used once per array: the second dimension mapped to "tensor" stays whole.
    mr = sh.MeshRules(sh.abstract_mesh((1, 1, 2)), sh.parse_rules("embed=tensor"))
    self.assertEqual(mr.spec(sh.LAYER_PARAM_AXES["w_gate"], (2, 8, 8)), jax.P(None, "tensor", None))

  def test_parse_rules_and_errors_name_the_field(self):
    rules = dict(sh.parse_rules("batch=data, slots=tensor,embed="))
    self.assertEqual(rules["batch"], ("data",))
    self.assertEqual(rules["slots"], ("tensor",))
    self.assertEqual(rules["embed"], ())
    self.assertEqual(rules["heads"], ("tensor",))  # untouched defaults stay
    with self.assertRaisesRegex(ValueError, "logical axis 'sequence'"):
      sh.parse_rules("sequence=data")
    with self.assertRaisesRegex(ValueError, "must read"):
      sh.parse_rules("batch")
    with self.assertRaisesRegex(ValueError, r"mesh.shape=\(2, 2\) needs 4 devices"):
      sh.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:1])
    with self.assertRaisesRegex(ValueError, "has 2 entries"):
      sh.make_mesh((1, 1), ("data",))
    with self.assertRaisesRegex(ValueError, r"heads=tensr names mesh axes \['tensr'\]"):
      sh.MeshRules(sh.abstract_mesh((1, 1, 2)), sh.parse_rules("heads=tensr"))
    with self.assertRaisesRegex(KeyError, "layers/w_new"):
      sh.param_axes((jax.tree_util.DictKey("layers"), jax.tree_util.DictKey("w_new")))

  def test_config_without_shape_means_one_device(self):
    import ml_collections  # pylint: disable=g-import-not-at-top

    self.assertIsNone(sh.mesh_rules_from_config(ml_collections.ConfigDict(dict(shape=(), axes=(), rules=""))))
    mr = sh.mesh_rules_from_config(ml_collections.ConfigDict(dict(shape=(1, -1), axes=("data", "tensor"),
                                                                  rules="heads=")))
    self.assertEqual(dict(mr.axis_sizes), {"data": 1, "tensor": jax.device_count()})
    self.assertEqual(mr.mesh_axes("heads"), ())

  def test_multihost_detection(self):
    self.assertFalse(sh.multihost_requested(environ={}))
    self.assertTrue(sh.multihost_requested(environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}))
    self.assertTrue(sh.multihost_requested(environ={"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}))
    self.assertFalse(sh.multihost_requested(environ={"TPU_WORKER_HOSTNAMES": "localhost"}))
    self.assertTrue(sh.multihost_requested(environ={"SLURM_NTASKS": "4"}))
    self.assertFalse(sh.multihost_requested(environ={"SLURM_NTASKS": "1"}))
    self.assertFalse(sh.multihost_requested(False, environ={"JAX_COORDINATOR_ADDRESS": "x:1"}))
    self.assertTrue(sh.multihost_requested(True, environ={}))


if __name__ == "__main__":
  sys.exit(run_child(*sys.argv[1:3]))
