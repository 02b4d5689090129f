"""The evaluation jobs: passkey / NIAH grid, LongBench pipeline, the shared-prefill generator and the configs.

A tiny random model stands in for the real one (it cannot retrieve anything), paired with the real SmolLM2
tokenizer (cheap to build from the embedded GGUF), so the tests check construction, scoring, invariants and the
end-to-end plumbing through `run(config, run_dir)`, not retrieval quality.
"""

import json
import os
import random
import tempfile

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
from ml_collections import config_flags

from lacax import generate as generation
from lacax.cache import registry
from lacax import errors
from lacax.eval import longbench as lb
from lacax.eval import needle_grid
from lacax.eval import passkey as pk
from lacax.eval.texts import default_text
from lacax.jobs import longbench as longbench_job
from lacax.jobs import passkey as passkey_job
from lacax.model import llama
from lacax.model.config import ModelConfig
from lacax.tokenizer import Tokenizer
from lacax.weights.gguf import smollm2_gguf_path
from lacax.weights.loader import Model

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_path(name: str) -> str:
  return os.path.join(_REPO, "configs", name)


def _parse_config(args):
  """The config as `experiments/run.py` parses it (locked, with command-line overrides)."""
  argv = ["run.py", *args]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return holder.value


_TOKENIZER = None


def smollm2_tokenizer() -> Tokenizer:
  global _TOKENIZER
  if _TOKENIZER is None:
    _TOKENIZER = Tokenizer.from_gguf(smollm2_gguf_path())
  return _TOKENIZER


def tiny_model(tokenizer: Tokenizer, num_layers: int = 4) -> Model:
  """A random 4-layer model over the real tokenizer's vocabulary."""
  cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_layers=num_layers,
                    num_heads=4, num_kv_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                    name="tiny-random")
  return Model(cfg=cfg, params=llama.init_params(cfg, jax.random.PRNGKey(0), std=0.1), tokenizer=tokenizer,
               source="tests")


class GridTest(parameterized.TestCase):
  """The prompts of the grid: lengths, needle placement, answers and decode budgets."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = smollm2_tokenizer()

  def test_passkey_grid_places_the_needle_where_it_says(self):
    lengths, depths = (160, 300), (0.0, 0.5, 1.0)
    grid = needle_grid.build_grid(self.tok.encode, task="passkey", lengths=lengths, depths=depths,
                                  samples_per_cell=2, seed=3, extra_new_tokens=1,
                                  answer_tokenize=lambda s: self.tok.encode(s, add_bos=False))
    self.assertLen(grid, 2 * 3 * 2)
    self.assertEqual([(g.length, g.depth, g.seed) for g in grid],
                     [(n, d, s) for n in lengths for d in depths for s in (3, 4)])
    for g in grid:
      sample = g.sample
      self.assertEqual(sample.answer, str(random.Random(g.seed).randint(1, 99999)))
      self.assertEqual(list(g.ids), self.tok.encode(sample.prompt))
      # Fitted to the cell's length: within budget and not more than a few tokens short of it.
      self.assertBetween(len(g.ids), g.length - 4, g.length)
      # The needle sits once, at the offset it reports, after exactly round(depth * n) filler characters.
      self.assertEqual(sample.prompt.count(sample.needle), 1)
      self.assertEqual(sample.prompt[sample.needle_offset:sample.needle_offset + len(sample.needle)], sample.needle)
      self.assertEqual(sample.prefix_chars, round(g.depth * sample.filler_chars))
      self.assertEqual(sample.prompt[:sample.needle_offset],
                       pk.PASSKEY_TASK_DESCRIPTION + "\n" + pk.filler_text(sample.prefix_chars) + "\n")
      self.assertTrue(sample.prompt.endswith("\n" + pk.PASSKEY_QUESTION))
      self.assertEqual(g.new_tokens, len(self.tok.encode(sample.answer, add_bos=False)) + 1)
    # Deeper needles sit later in the token sequence: tokens before the needle grow with the depth.
    before = {g.depth: len(self.tok.encode(g.sample.prompt[:g.sample.needle_offset]))
              for g in grid if g.length == 300 and g.seed == 3}
    self.assertLess(before[0.0], before[0.5])
    self.assertLess(before[0.5], before[1.0])
    self.assertEqual(before[0.0], len(self.tok.encode(pk.PASSKEY_TASK_DESCRIPTION + "\n\n")))

  def test_niah_grid_depth_in_tokens_and_contiguous_haystack(self):
    haystack = default_text()[:30000]
    needle = dict(needle_grid.NIAH_DEFAULTS)
    grid = needle_grid.build_grid(self.tok.encode, task="niah", lengths=(256,), depths=(0.25, 0.75),
                                  samples_per_cell=1, seed=5, depth_unit="tokens", suffix_mode="continue",
                                  haystack=haystack, needle=needle)
    for g in grid:
      sample = g.sample
      self.assertLen(sample.answer, needle["digits"])
      self.assertEqual(sample.needle, needle["template"].format(answer=sample.answer))
      self.assertLessEqual(len(g.ids), 256)
      filler = pk.filler_text(sample.filler_chars, haystack)
      filler_tokens = len(self.tok.encode(filler))
      self.assertAlmostEqual(sample.depth, g.depth, delta=2 / filler_tokens)
      # Removing the needle line leaves description + the haystack's first n characters + question.
      self.assertEqual(sample.prompt.replace("\n" + sample.needle + "\n", "", 1),
                       needle["task_description"] + "\n" + filler + "\n" + needle["question"])

  def test_length_below_an_empty_prompt_is_rejected_naming_the_field(self):
    with self.assertRaisesRegex(ValueError, r"grid\.lengths contains 20"):
      needle_grid.build_grid(self.tok.encode, task="passkey", lengths=(20,), depths=(0.5,), samples_per_cell=1)

  def test_completion_is_cut_to_the_answer_budget(self):
    tokens = self.tok.encode(" 12345 and more", add_bos=False)
    self.assertEqual(needle_grid.completion_text(self.tok, tokens, 6), "12345")
    self.assertEqual(needle_grid.completion_text(self.tok, tokens, 3), "12")


class ScoringTest(absltest.TestCase):

  def _sample(self, length, depth):
    sample = pk.NeedleSample(prompt="", answer="1", needle="", needle_offset=0, depth=depth, depth_unit="chars",
                             prefix_chars=0, filler_chars=0)
    return needle_grid.GridSample(length=length, depth=depth, seed=0, sample=sample, ids=(1,), new_tokens=1)

  def test_pass_rate_grid_counts_per_cell(self):
    lengths, depths = (100, 200), (0.0, 0.5, 1.0)
    grid = [self._sample(100, 0.0), self._sample(100, 0.0), self._sample(200, 0.0), self._sample(100, 0.5),
            self._sample(200, 1.0), self._sample(200, 1.0), self._sample(200, 1.0)]
    correct = [True, False, True, False, True, True, False]
    rates = needle_grid.pass_rate_grid(grid, correct, lengths, depths)
    expected = np.array([[0.5, 1.0], [0.0, np.nan], [np.nan, 2 / 3]])
    np.testing.assert_array_equal(np.isnan(rates), np.isnan(expected))
    np.testing.assert_allclose(np.nan_to_num(rates), np.nan_to_num(expected))
    table = needle_grid.format_grid("lacache", rates, lengths, depths)
    self.assertIn("lacache: mean pass rate 54.2%", table)  # mean of the four filled cells
    with self.assertRaisesRegex(ValueError, "7 samples but 2 scores"):
      needle_grid.pass_rate_grid(grid, correct[:2], lengths, depths)

  def test_length_labels(self):
    self.assertEqual([needle_grid.length_label(n) for n in (512, 1024, 1500, 131072)], ["512", "1k", "1500", "128k"])


class OneShotTest(absltest.TestCase):
  """`oneshot_generate` (one prefill shared by the policies) equals `generate` run policy by policy."""

  def test_shared_prefill_equals_generate_per_policy(self):
    cfg = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                      num_kv_heads=2)
    params = llama.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 101, 180).tolist(), rng.integers(0, 101, 150).tolist()]
    cache = dict(budget=0.5, start_size=2, span=2, overlap=0, window=8)
    names = ("full", "lacache", "h2o")  # two prefill groups: (slot, no scores) and (original, accumulate)
    policies = {n: registry.make_prefill_policy(n, cache, cfg, prompt_len=180) for n in names}
    result = generation.oneshot_generate(params, cfg, prompts, policies, max_new_tokens=10)
    for name, policy in policies.items():
      expected = generation.generate(params, cfg, prompts, max_new_tokens=10, policy=policy)
      self.assertEqual(result.tokens[name], expected.tokens, name)
    # The budget is tight enough that compaction changes what the model writes.
    self.assertNotEqual(result.tokens["lacache"], result.tokens["full"])
    self.assertNotEqual(result.tokens["h2o"], result.tokens["full"])

  def test_shared_prefill_records_the_statistics_the_policies_read(self):
    # ThinK (the window's queries), CriticalKV (||W_o v||), online ExpectedAttention (query moments): the shared
    # prefill cache records what each group reads (it recorded none before, and ThinK raised in the hand-off).
    cfg = ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                      num_kv_heads=2)
    params = llama.init_params(cfg, jax.random.PRNGKey(0), std=0.3)
    prompts = [np.random.default_rng(1).integers(0, 101, 96).tolist()]
    cache = dict(budget=0.5, window=8, kernel=3, expected_attention_statistics="online", inner="knorm")
    names = ("think", "criticalkv", "expectedattention", "full")
    policies = {n: registry.make_prefill_policy(n, cache, cfg, prompt_len=96) for n in names}
    self.assertLen({generation.prefill_signature(p) for p in policies.values()}, 4)
    result = generation.oneshot_generate(params, cfg, prompts, policies, max_new_tokens=6)
    for name, policy in policies.items():
      expected = generation.generate(params, cfg, prompts, max_new_tokens=6, policy=policy)
      self.assertEqual(result.tokens[name], expected.tokens, name)

  def test_batches_share_policies(self):
    lengths = {0: 10, 1: 20, 2: 10, 3: 10, 4: 20}
    batches = generation.batches_by_policy(list(lengths), lambda i: {"s": ("size", lengths[i])}, batch_size=2)
    self.assertEqual([(members, p["s"][1]) for members, p in batches], [([0, 2], 10), ([3], 10), ([1, 4], 20)])
    with self.assertRaisesRegex(ValueError, "batch_size=0"):
      generation.batches_by_policy([1], lambda i: {}, batch_size=0)


class PasskeyJobTest(absltest.TestCase):

  def test_end_to_end_with_a_cache_that_never_compacts(self):
    from configs import passkey as passkey_config  # pylint: disable=g-import-not-at-top

    tok = smollm2_tokenizer()
    model = tiny_model(tok)
    config = passkey_config.get_config("cpu")
    config.grid.lengths = (160, 224)
    config.grid.depths = (0.0, 1.0)
    config.grid.samples_per_cell = 1
    config.cache.span = 2
    # C = 4 x prompt > prompt + answer: no policy ever evicts, so every one must write what the full cache writes.
    config.cache.budget = 4.0
    run_dir = tempfile.mkdtemp(prefix="lacax_run_")
    out = passkey_job.run(config, run_dir, model=model)
    self.assertTrue(os.path.isfile(os.path.join(run_dir, "heatmap.png")))
    self.assertEqual(out["lengths"], [160, 224])
    self.assertEqual(out["depths"], [0.0, 1.0])
    self.assertLen(out["samples"], 4)
    for name in ("full", "streaming", "lacache"):
      figure = out["figures"][name]
      self.assertEqual(np.asarray(figure["pass_rate"]).shape, (2, 2))
      self.assertBetween(figure["mean"], 0.0, 1.0)
    for record in out["samples"]:
      texts = {name: o["text"] for name, o in record["outputs"].items()}
      self.assertEqual(texts["streaming"], texts["full"], record)
      self.assertEqual(texts["lacache"], texts["full"], record)
      for o in record["outputs"].values():
        self.assertEqual(o["correct"], record["answer"] in o["text"])
    json.dumps(out)  # the launcher writes it as JSON


class LongBenchJobTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = smollm2_tokenizer()
    cls.data_dir = tempfile.mkdtemp(prefix="lacax_longbench_")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = random.Random(0)

    def context(marker):
      body = [rng.choice(words) for _ in range(400)]
      body[200] = marker  # the middle, which truncation to a short max_length drops
      return "START " + " ".join(body) + " END"

    fixture = {
        "hotpotqa": [dict(input=f"Which word is number {i}?", context=context(f"MIDDLE{i}"), answers=["alpha beta"],
                          length=400, dataset="hotpotqa", language="en", all_classes=None, _id=f"h{i}")
                     for i in range(2)],
        "trec": [dict(input=f"Question {i}: what is it?\nType:", context=context(f"MIDDLE{i}"), answers=["Number"],
                      length=400, dataset="trec", language="en", all_classes=["Number", "Location", "Person"],
                      _id=f"t{i}") for i in range(2)],
    }
    for task, rows in fixture.items():
      with open(os.path.join(cls.data_dir, f"{task}.jsonl"), "w") as f:
        for row in rows:
          f.write(json.dumps(row) + "\n")

  def test_inputs_are_truncated_in_the_middle_and_chat_wrapped_as_official(self):
    data = lb.load_longbench(self.data_dir)
    max_length = 200
    chat_ids = longbench_job.build_input("hotpotqa", data["hotpotqa"][0], self.tok, max_length=max_length, chat=True)
    chat_text = self.tok.decode(chat_ids, skip_special_tokens=False)
    self.assertTrue(chat_text.startswith("<|im_start|>"))
    self.assertIn("START", chat_text)  # the start of the context survives...
    self.assertIn("Question: Which word is number 0?\nAnswer:", chat_text)  # ...and so does the question
    self.assertNotIn("MIDDLE0", chat_text)  # the middle is gone
    template_overhead = len(self.tok.encode(self.tok.apply_chat_template([{"role": "user", "content": ""}]),
                                            add_bos=False))
    self.assertLessEqual(len(chat_ids), max_length + template_overhead + 2)
    raw_ids = longbench_job.build_input("trec", data["trec"][0], self.tok, max_length=max_length, chat=True)
    raw_text = self.tok.decode(raw_ids, skip_special_tokens=False)
    self.assertFalse(raw_text.startswith("<|im_start|>"))  # trec is fed raw even with chat=True
    self.assertTrue(raw_text.startswith("Please determine the type of the question below."))
    self.assertNotIn("MIDDLE0", raw_text)
    self.assertLessEqual(len(raw_ids), max_length + 2)

  def test_samsum_also_stops_at_a_newline(self):
    newline = self.tok.encode("\n", add_bos=False)[-1]
    self.assertIn(newline, longbench_job.stop_ids_for("samsum", self.tok))
    self.assertNotIn(newline, longbench_job.stop_ids_for("hotpotqa", self.tok))
    self.assertEqual(longbench_job.stop_ids_for("hotpotqa", self.tok)[:len(self.tok.stop_ids)], self.tok.stop_ids)

  def test_end_to_end_predictions_rescore_to_the_reported_scores(self):
    from configs import longbench as longbench_config  # pylint: disable=g-import-not-at-top

    config = longbench_config.get_config("cpu")
    config.data.path = self.data_dir
    config.tasks = ("hotpotqa", "trec")
    config.policies = ("full", "lacache")
    config.max_length = 200
    config.cache.span = 2
    run_dir = tempfile.mkdtemp(prefix="lacax_run_")
    out = longbench_job.run(config, run_dir, model=tiny_model(self.tok))
    self.assertEqual(out["tasks"], ["hotpotqa", "trec"])
    for name in ("full", "lacache"):
      predictions = lb.load_predictions(os.path.join(run_dir, "pred", name))
      self.assertEqual(sorted(predictions), ["hotpotqa", "trec"])
      self.assertLen(predictions["trec"], 2)
      self.assertEqual(predictions["trec"][0].all_classes, ("Number", "Location", "Person"))
      self.assertEqual(out["figures"][name]["scores"], lb.score_longbench(predictions))
    json.dumps(out)

  def test_default_data_path_explains_where_longbench_comes_from(self):
    from configs import longbench as longbench_config  # pylint: disable=g-import-not-at-top

    with self.assertRaisesRegex(errors.ValidationError,
                                r"data\.path is empty.*THUDM/LongBench.*--config\.data\.path"):
      longbench_job.run(longbench_config.get_config("cpu"), tempfile.mkdtemp(prefix="lacax_run_"))


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      ("passkey.py", ""), ("passkey.py", "cpu"), ("passkey.py", "ref"), ("niah.py", ""), ("niah.py", "cpu"),
      ("kvmerger.py", ""), ("kvmerger.py", "cpu"), ("kvmerger.py", "budget35"), ("kvmerger.py", "longbench"),
      ("longbench.py", ""), ("longbench.py", "cpu"), ("longbench.py", "budget25"), ("longbench.py", "smollm2"),
      ("streaming.py", ""), ("streaming.py", "cpu"), ("streaming.py", "1024"), ("lacache.py", "cpu"))
  def test_configs_load_and_validate(self, name, variant):
    config = _parse_config([f"--config={_config_path(name)}" + (f":{variant}" if variant else "")])
    if config.experiment in ("passkey", "niah"):
      passkey_job.validate_config(config)
    elif config.experiment == "longbench":
      longbench_job.validate_config(config)
    else:
      for policy in config.policies:
        registry.make_policy(policy, config.cache)
    if variant == "cpu" and config.experiment in ("passkey", "niah"):
      self.assertLessEqual(max(config.grid.lengths), 1024)

  def test_every_experiment_config_can_be_resumed(self):
    # The launcher tells a failed run to finish with --config.resume=<dir>: every config must have the field.
    import glob  # pylint: disable=g-import-not-at-top
    import importlib  # pylint: disable=g-import-not-at-top

    for path in sorted(glob.glob(os.path.join(os.path.dirname(_config_path("passkey.py")), "*.py"))):
      name = os.path.basename(path)[:-3]
      if name.startswith("_"):
        continue
      config = importlib.import_module(f"configs.{name}").get_config(None)
      self.assertIn("resume", config, f"configs/{name}.py has no resume field")
      self.assertEqual(config.resume, "", name)

  def test_override_typo_is_rejected_and_good_override_applies(self):
    config = _parse_config([f"--config={_config_path('passkey.py')}:cpu", "--config.cache.budget=0.25",
                            "--config.grid.lengths=(256,)"])
    self.assertEqual(config.cache.budget, 0.25)
    self.assertEqual(tuple(config.grid.lengths), (256,))
    with self.assertRaisesRegex(AttributeError, 'Did you mean "lengths" instead of "lenghts"'):
      _parse_config([f"--config={_config_path('passkey.py')}:cpu", "--config.grid.lenghts=(256,)"])

  def test_unknown_variant_is_rejected(self):
    from configs import passkey as passkey_config  # pylint: disable=g-import-not-at-top

    with self.assertRaisesRegex(ValueError, "variant 'gpu' is unknown"):
      passkey_config.get_config("gpu")

  def test_validation_names_field_value_and_constraint(self):
    from configs import passkey as passkey_config  # pylint: disable=g-import-not-at-top

    cases = [(("policies",), ("full", "bogus"), r"policies contains 'bogus'; expected names from"),
             (("grid", "depths"), (0.0, 1.5), r"grid\.depths=\(0\.0, 1\.5\) must be .* fractions in \[0, 1\]"),
             (("cache", "budget"), 0.0, r"cache\.budget=0\.0 must be a positive fraction"),
             (("grid", "samples_per_cell"), 0, r"grid\.samples_per_cell=0 must be an int >= 1")]
    for path, value, message in cases:
      config = passkey_config.get_config("cpu")
      node = config
      for key in path[:-1]:
        node = node[key]
      node[path[-1]] = value
      with self.assertRaisesRegex(ValueError, message):
        passkey_job.validate_config(config)


if __name__ == "__main__":
  absltest.main()
