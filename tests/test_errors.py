"""Errors name the file and the problem; numbers are honest; a cache that cannot fit is refused up front."""

import contextlib
import io as std_io
import json
import os
import shutil
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from configs import lacache as lacache_config
from lacax import errors
from lacax import generate as generation
from lacax import memory
from lacax import runs
from lacax.cache.registry import make_policy
from lacax.eval import longbench as lb
from lacax.eval.texts import load_text
from lacax.jobs import lacache as lacache_job
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.weights.loader import load_model
from tests import hf_models


def _copy_model(source: str | None = None) -> str:
  source = source or hf_models.saved_model("llama_tied")[0]
  target = os.path.join(tempfile.mkdtemp(), "model")
  shutil.copytree(source, target)
  return target


class NamedFileErrorsTest(absltest.TestCase):

  def test_truncated_safetensors_names_the_file(self):
    path = _copy_model()
    weights = os.path.join(path, "model.safetensors")
    size = os.path.getsize(weights)
    for cut in (size - 10, 7):
      with open(weights, "r+b") as f:
        f.truncate(cut)
      with self.assertRaises(errors.CheckpointError) as ctx:
        load_model(path)
      self.assertEqual(ctx.exception.path, weights)
      self.assertIn("truncated safetensors file", str(ctx.exception))

  def test_invalid_config_json_names_file_line_and_column(self):
    path = _copy_model()
    with open(os.path.join(path, "config.json"), "w") as f:
      f.write('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}')
    with self.assertRaisesRegex(errors.DataError, rf"{path}/config.json, line 3, column 21: invalid config.json"):
      load_model(path)

  def test_non_utf8_text_names_file_byte_offset_and_encoding_option(self):
    path = os.path.join(tempfile.mkdtemp(), "book.txt")
    with open(path, "wb") as f:
      f.write(b"plain ascii then \xe9t\xe9")
    with self.assertRaises(errors.DataError) as ctx:
      load_text(path, option="data")
    self.assertEqual(str(ctx.exception).split(": ")[0], f"{path}, byte offset 17")
    self.assertIn("set data.encoding to the file's encoding", str(ctx.exception))
    self.assertEqual(load_text(path, encoding="latin-1"), "plain ascii then \u00e9t\u00e9")

  def test_jsonl_null_where_text_is_expected_names_file_line_and_field(self):
    path = os.path.join(tempfile.mkdtemp(), "texts.jsonl")
    with open(path, "w") as f:
      f.write(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": None}) + "\n")
    with self.assertRaisesRegex(errors.DataError, rf"{path}, line 3: field 'text' is null where text is expected"):
      load_text(path)
    with open(path, "w") as f:
      f.write('{"text": "one"}\n{"text": "tw\n')
    with self.assertRaisesRegex(errors.DataError, rf"{path}, line 2: invalid JSON"):
      load_text(path)

  def test_longbench_reader_is_the_same_reader(self):
    path = os.path.join(tempfile.mkdtemp(), "trec.jsonl")
    with open(path, "wb") as f:
      f.write(b'{"input": "caf\xe9"}\n')
    with self.assertRaises(lb.LongBenchFormatError) as ctx:
      lb.load_longbench_file(path)
    self.assertIsInstance(ctx.exception, errors.DataError)
    self.assertIn(f"{path}, byte offset 14: not valid utf-8", str(ctx.exception))


class ValidationTest(absltest.TestCase):

  def test_empty_longbench_task_file_is_reported_with_the_other_problems(self):
    from configs import longbench as longbench_config  # pylint: disable=g-import-not-at-top
    from lacax.jobs import longbench as longbench_job  # pylint: disable=g-import-not-at-top

    data = tempfile.mkdtemp()
    open(os.path.join(data, "trec.jsonl"), "w").close()
    with open(os.path.join(data, "hotpotqa.jsonl"), "w") as f:
      f.write(json.dumps(dict(input="q", context="c", answers=["a"], length=1, dataset="hotpotqa", language="en",
                              all_classes=None, _id="0")) + "\n")
    config = longbench_config.get_config("cpu")
    config.data.path, config.tasks, config.batch_size = data, ("hotpotqa", "trec"), 0
    config.model.path = os.path.join(data, "missing.gguf")
    with self.assertRaises(errors.ValidationError) as ctx:
      longbench_job.validate(config)
    self.assertEqual(ctx.exception.problems, [
        "batch_size=0 must be an int >= 1",
        f"the trec file in data.path={data!r} holds no examples",
        f"model.path={config.model.path!r} does not exist (expected a checkpoint directory or a .gguf file)"])


class MemoryTest(absltest.TestCase):

  def test_cache_bytes_are_exact_and_an_oversized_request_is_refused_up_front(self):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    policy = make_policy("full", {})
    cache = policy.init(cfg, 3, 100)
    self.assertEqual(memory.cache_bytes(policy, cfg, 3, 100), sum(x.nbytes for x in jax.tree.leaves(cache)))
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    need = memory.cache_bytes(policy, cfg, 1, 64)  # the prompt padded to 64 holds the 3 + 10 tokens
    with mock.patch.dict(os.environ, {memory.LIMIT_ENV: str(need - 1)}), \
        mock.patch.object(generation, "prefill", side_effect=AssertionError("allocated before the check")):
      with self.assertRaises(errors.ResourceError) as ctx:
        generation.generate(params, cfg, [[1, 2, 3]], max_new_tokens=10)
    self.assertEqual((ctx.exception.needed, ctx.exception.available), (need, need - 1))
    self.assertIn(f"needs a KV cache of {need} bytes", str(ctx.exception))
    with mock.patch.dict(os.environ, {memory.LIMIT_ENV: str(need)}):
      self.assertLen(generation.generate(params, cfg, [[1, 2, 3]], max_new_tokens=10).tokens[0], 10)


class HugePagesTest(absltest.TestCase):
  """glibc's huge-page tunable for XLA:CPU's per-step temporaries (`lacax.memory`; measured in bench_train)."""

  def test_env_keeps_other_tunables_and_sets_it_once(self):
    env = memory.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0", "A": "1"})
    self.assertEqual(env["GLIBC_TUNABLES"], "glibc.malloc.arena_max=2:" + memory.HUGEPAGE_TUNABLE)
    self.assertEqual(env["A"], "1")
    self.assertEqual(memory.hugepage_env({})["GLIBC_TUNABLES"], memory.HUGEPAGE_TUNABLE)

  def test_reexec_restarts_once_with_the_tunable_unless_turned_off(self):
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    script = ("import os, sys; from lacax import memory; print('start', os.getpid(), flush=True); "
              "memory.reexec_with_hugepages(['-c', sys.argv[1], sys.argv[1]]); "
              "print('tunable', memory.malloc_hugepages(), os.getpid())")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", script, script], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    starts = [l for l in out if l.startswith("start")]
    applies = memory._thp_mode() == "madvise" and memory._glibc_at_least(2, 35)  # pylint: disable=protected-access
    self.assertLen(starts, 2 if applies else 1)  # restarted at most once
    self.assertIn(f"tunable {applies} {starts[0].split()[1]}", out)  # the same process id
    off = subprocess.run([sys.executable, "-c", script, script], env={**env, "LACAX_HUGEPAGES": "0"},
                         capture_output=True, text=True, check=True).stdout
    self.assertEqual(off.count("start"), 1)
    self.assertIn("tunable False", off)


class HonestNumbersTest(absltest.TestCase):

  def test_nan_perplexity_is_flagged_in_table_and_json(self):
    path = _copy_model(hf_models.saved_model_with_tokenizer(num_layers=4))
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], np.nan)
    save_file(tensors, weights, metadata={"format": "pt"})
    config = lacache_config.get_config("cpu")
    config.model.path = path
    config.num_tokens, config.chunk, config.cache.size, config.cache.span = 40, 20, 16, 2
    config.policies = ("full",)
    run_dir = runs.RunDir(tempfile.mkdtemp())
    with contextlib.redirect_stdout(std_io.StringIO()) as out:
      result = lacache_job.run(config, run_dir)
    self.assertIn("non-finite NLL at 40 of 40 predicted tokens", result["figures"]["full"]["error"])
    self.assertIn("NON-FINITE", out.getvalue())
    self.assertIn("!!! full: non-finite NLL", out.getvalue())
    flagged = run_dir.write_results(result)
    self.assertIn("figures.full.ppl", flagged)
    with open(os.path.join(run_dir.path, "results.json")) as f:
      self.assertNotIn("NaN,", f.read().replace('"NaN"', ""))


if __name__ == "__main__":
  absltest.main()
