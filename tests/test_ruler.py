"""RULER: the official scorers on fixed strings, the generators' determinism and properties, and the job.

The scorers are checked against RULER's own code (`scripts/eval/synthetic/constants.py`, copied below as the
reference); the generators against what each task promises (every gold string is in the prompt, the frequent
words are the most frequent, the prompt fits the length); the job end to end on a tiny random model with a
cache that never compacts (every policy must then write what the full cache writes) and its resume.
"""

import collections
import dataclasses
import json
import os
import re
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from lacax import runs
from lacax.eval import ruler
from lacax.eval.ruler import words as ruler_words
from tests import test_jobs


# --- RULER's scripts/eval/synthetic/constants.py and evaluate.py::postprocess_pred (Apache-2.0), verbatim ---
def _official_string_match_part(preds, refs):
  score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) for pred, ref in zip(preds, refs)]) / len(preds) * 100
  return round(score, 2)


def _official_string_match_all(preds, refs):
  score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref) for pred, ref in zip(preds, refs)]) / len(preds) * 100
  return round(score, 2)


def _official_postprocess_pred(predict_str):
  predict_str = predict_str.strip()
  np_pattern = re.compile(r'[\x00-\x1f]')
  predict_str = np_pattern.sub('\n', predict_str).strip()
  return predict_str
# ---------------------------------------------------------------------------------------------------------------


def _words(text, prefix):
  """A whitespace 'tokenizer': lengths in words, fast enough to sweep every task."""
  return (text + prefix).split()


_PREDS = ["The special magic numbers are 1234567 and 7654321.", "  uuid: AbCd-EF01\x07 and nothing else\t",
          "none of them", "Answer: BLUE, red", ""]
_REFS = [["1234567", "7654321", "1111111"], ["abcd-ef01"], ["x", "y"], ["Blue", "green"], ["z"]]


class MetricsTest(parameterized.TestCase):

  def test_string_match_all_equals_the_official_formula(self):
    got = ruler.score_task("string_match_all", _PREDS, _REFS)
    want = _official_string_match_all([_official_postprocess_pred(p) for p in _PREDS], _REFS)
    self.assertEqual(got, want)
    self.assertEqual(got, round((2 / 3 + 1 + 0 + 1 / 2 + 0) / 5 * 100, 2))  # 43.33

  def test_string_match_part_equals_the_official_formula(self):
    got = ruler.score_task("string_match_part", _PREDS, _REFS)
    self.assertEqual(got, _official_string_match_part([_official_postprocess_pred(p) for p in _PREDS], _REFS))
    self.assertEqual(got, 60.0)

  def test_postprocess_and_per_sample_scores(self):
    for p in _PREDS:
      self.assertEqual(ruler.postprocess_pred(p), _official_postprocess_pred(p))
    self.assertEqual(ruler.postprocess_pred(" a\x07b\tc "), "a\nb\nc")
    per_sample = [ruler.sample_match(p, r, "string_match_all") for p, r in zip(_PREDS, _REFS)]
    self.assertEqual(round(sum(per_sample) / len(per_sample) * 100, 2),
                     ruler.score_task("string_match_all", _PREDS, _REFS))
    self.assertEqual(ruler.average({"a": 10.0, "b": 30.0}), 20.0)

  def test_bad_inputs_name_the_problem(self):
    with self.assertRaisesRegex(ValueError, "2 predictions but 1 reference lists"):
      ruler.string_match_all(["a", "b"], [["a"]])
    with self.assertRaisesRegex(ValueError, r"references\[0\]='a' must be a non-empty list"):
      ruler.string_match_part(["a"], ["a"])
    with self.assertRaisesRegex(ValueError, "metric='f1' must be one of"):
      ruler.score_task("f1", ["a"], [["a"]])


class GeneratorTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.samples = {(task, length): ruler.generate(task, length, 2, _words, seed=42)
                   for task in ruler.TASKS for length in (1024, 4096)}

  def test_suite_is_rulers_default_thirteen_tasks(self):
    self.assertEqual(list(ruler.TASKS), [
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"])
    self.assertEqual([ruler.tokens_to_generate(t) for t in ("niah_single_1", "vt", "cwe", "fwe", "qa_1")],
                     [128, 30, 120, 50, 32])
    self.assertEqual(ruler.metric_of("qa_2"), "string_match_part")
    self.assertEqual(ruler.metric_of("niah_multivalue"), "string_match_all")
    self.assertEqual(ruler.DEPTHS[:4], [0, 3, 5, 8])
    self.assertLen(ruler.DEPTHS, 40)

  def test_deterministic_by_seed_and_different_across_samples_and_seeds(self):
    for task in ("niah_multikey_1", "vt", "cwe", "fwe", "qa_2"):
      again = ruler.generate(task, 1024, 2, _words, seed=42)
      self.assertEqual(again, self.samples[(task, 1024)], task)
      self.assertNotEqual(again[0].input, again[1].input, task)
      other = ruler.generate(task, 1024, 1, _words, seed=7)
      self.assertNotEqual(other[0].input, again[0].input, task)

  def test_every_prompt_fits_its_length_and_is_near_it(self):
    for (task, length), samples in self.samples.items():
      for s in samples:
        total = len(s.ids) + s.new_tokens
        self.assertLessEqual(total, length, (task, length))
        self.assertGreater(total, 0.6 * length, (task, length))  # the haystack was grown to the budget
        self.assertEqual(s.ids, tuple(_words(s.input, s.answer_prefix)))

  def test_gold_strings_are_in_the_prompt(self):
    for (task, length), samples in self.samples.items():
      for s in samples:
        for gold in s.outputs:
          self.assertIn(gold, s.input, (task, length))

  def test_niah_needles_and_wording(self):
    single = self.samples[("niah_single_1", 1024)][0]
    self.assertTrue(single.input.startswith("A special magic number is hidden within the following text."))
    self.assertRegex(single.input, r"One of the special magic numbers for [a-z]+-[a-z]+ is: " + single.outputs[0])
    self.assertRegex(single.answer_prefix, r"^ The special magic number for [a-z]+-[a-z]+ mentioned in the "
                     r"provided text is$")
    self.assertRegex(single.outputs[0], r"^\d{7}$")
    multivalue = self.samples[("niah_multivalue", 4096)][0]
    self.assertLen(multivalue.outputs, 4)
    self.assertTrue(multivalue.input.startswith("Some special magic numbers are hidden"))
    query = multivalue.answer_prefix.split(" for ")[1].split(" mentioned")[0]
    for value in multivalue.outputs:
      self.assertIn(f"for {query} is: {value}.", multivalue.input)
    multiquery = self.samples[("niah_multiquery", 4096)][0]
    self.assertLen(multiquery.outputs, 4)
    self.assertEqual(multiquery.answer_prefix.count(","), 3)  # "a, b, c, and d"
    uuid_sample = self.samples[("niah_multikey_3", 1024)][0]
    self.assertRegex(uuid_sample.outputs[0], r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
    # multikey_2/3: the haystack is made of distractor needles, the real one among them
    self.assertGreater(uuid_sample.input.count("One of the special magic uuids for"), 3)
    noise = self.samples[("niah_single_1", 4096)][0]
    self.assertGreater(noise.input.count(ruler.NOISE), 50)

  def test_variable_tracking_chain_resolves_to_the_answer(self):
    for length in (1024, 4096):
      s = self.samples[("vt", length)][0]
      question = s.input[s.input.rindex("Memorize and track"):]  # after the in-context example
      value = re.search(r"assigned the value (\d+) in the text above", question).group(1)
      self.assertIn(f"{len(s.outputs)} variables are assigned the value {value}", s.answer_prefix)
      assignments = dict(re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", question))
      resolved = set()
      for name in assignments:
        target = name
        while assignments.get(target, "").startswith("VAR "):
          target = assignments[target][4:]
        if assignments.get(target) == value:
          resolved.add(name)
      self.assertEqual(resolved, set(s.outputs))
      self.assertEqual(s.input.count("Memorize and track the chain(s)"), 2)  # the example, then the question

  def test_common_words_are_the_most_common(self):
    for length, (common, rare) in ((1024, (6, 1)), (4096, (30, 3))):
      s = self.samples[("cwe", length)][0]
      question = s.input[s.input.rindex("Below is a numbered list"):]
      counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", question))
      self.assertEqual({counts[w] for w in s.outputs}, {common})
      self.assertEqual({c for w, c in counts.items() if w not in s.outputs}, {rare})
      self.assertLen(s.outputs, 10)

  def test_frequent_words_are_the_three_most_frequent_after_the_noise(self):
    for length in (1024, 4096):
      s = self.samples[("fwe", length)][0]
      coded = s.input.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
      ranked = [w for w, _ in collections.Counter(coded).most_common()]
      self.assertEqual(ranked[0], "...")
      self.assertEqual(set(ranked[1:4]), set(s.outputs))

  def test_qa_documents_hold_the_answer_chain(self):
    one = self.samples[("qa_1", 4096)][0]
    attribute, name = re.search(r"Question: What is the (.+) of (.+)\?$", one.input).groups()
    self.assertIn(f"The {attribute} of {name} is {one.outputs[0]}.", one.input)
    two = self.samples[("qa_2", 4096)][0]
    name = re.search(r"What is the town where (.+) was born known for\?$", two.input).group(1)
    town = re.search(re.escape(name) + r" was born in the town of ([A-Za-z]+)\.", two.input).group(1)
    self.assertIn(f"The town of {town} is known for its {two.outputs[0]}.", two.input)
    self.assertGreater(two.input.count("Document "), 10)

  def test_too_short_a_length_is_rejected_naming_it(self):
    with self.assertRaisesRegex(ValueError, "length 200 is too short for RULER task 'vt'"):
      ruler.generate("vt", 200, 1, _words)
    with self.assertRaisesRegex(ValueError, "task='niah' must be one of"):
      ruler.generate("niah", 1024, 1, _words)

  def test_word_sources(self):
    vocab = ruler_words.english_words()
    self.assertLen(vocab, 20000)
    self.assertLen(set(vocab), 20000)
    self.assertTrue(all(w.isalpha() and w.islower() for w in vocab))
    self.assertEqual(ruler_words.split_sentences("A b. C d? E!  F"), ["A b.", "C d?", "E!", "F"])
    self.assertEqual(ruler_words.essay_words(" a \n b\tc "), ["a", "b", "c"])


class KvpressNiahTest(parameterized.TestCase):

  @parameterized.parameters(0.0, 0.37, 1.0)
  def test_needle_goes_in_at_the_token_index_of_a_cut_haystack(self, depth):
    from lacax.eval import needle_grid  # pylint: disable=g-import-not-at-top
    from lacax.eval.texts import default_text  # pylint: disable=g-import-not-at-top

    encode = lambda text: text.split()  # a word 'tokenizer': ids are words, decode joins them
    decode = " ".join
    haystack = encode(default_text())[:5000]
    needle = "The special magic number is: 1234567."
    s = needle_grid.kvpress_niah_sample(haystack, max_context_length=700, depth=depth, needle=needle,
                                        answer="1234567", question="What is the number?", encode=encode,
                                        decode=decode)
    kept = 700 - 6 - 150  # kvpress: max_context_length - needle tokens - 150
    index = int(kept * depth)
    want = decode(haystack[:index] + encode(needle) + haystack[index:kept])
    self.assertEqual(s.prompt, f"This is a very long story book: <book> {want} </book>.\nWhat is the number?")
    self.assertEqual(s.prompt[s.needle_offset:s.needle_offset + len(needle)], needle)
    self.assertAlmostEqual(s.depth, index / kept)
    with self.assertRaisesRegex(ValueError, "max_context_length=100 leaves no haystack"):
      needle_grid.kvpress_niah_sample(haystack, max_context_length=100, depth=0.5, needle=needle, answer="1",
                                      question="q", encode=encode, decode=decode)

  def test_niah_config_variants_validate(self):
    from configs import niah as niah_config  # pylint: disable=g-import-not-at-top
    from lacax.jobs import passkey as passkey_job  # pylint: disable=g-import-not-at-top

    for variant in ("kvpress", "kvpress_cpu"):
      config = niah_config.get_config(variant)
      self.assertEqual(config.grid.protocol, "kvpress")
      passkey_job.validate_config(config)
    self.assertEqual(niah_config.get_config("cpu").grid.protocol, "lacache")
    config = niah_config.get_config("cpu")
    config.grid.protocol = "infinite"
    with self.assertRaisesRegex(ValueError, r"grid\.protocol='infinite' must be one of \['lacache', 'kvpress'\]"):
      passkey_job.validate_config(config)


class RulerJobTest(absltest.TestCase):

  def test_end_to_end_with_a_cache_that_never_compacts_and_resume(self):
    from configs import ruler as ruler_config  # pylint: disable=g-import-not-at-top
    from lacax.jobs import ruler as ruler_job  # pylint: disable=g-import-not-at-top

    tok = test_jobs.smollm2_tokenizer()
    model = test_jobs.tiny_model(tok)
    config = ruler_config.get_config("cpu")
    config.tasks = ("niah_single_1",)  # one cell: each policy's decode loop compiles (~20 s on a loaded CPU)
    config.policies = ("full", "streaming")
    config.lengths = (384,)
    config.num_samples = 2
    config.cache.span = 2
    config.cache.budget = 4.0  # C = 4 x prompt: nothing is ever evicted, every policy equals the full cache
    run_dir = tempfile.mkdtemp(prefix="lacax_ruler_")
    out = ruler_job.run(config, run_dir, model=model)
    self.assertTrue(os.path.isfile(os.path.join(run_dir, "ruler.png")))
    self.assertLen(out["samples"], 2)
    for record in out["samples"]:
      texts = {name: p["text"] for name, p in record["predictions"].items()}
      self.assertEqual(texts["streaming"], texts["full"], record)
      self.assertLessEqual(record["prompt_tokens"], 384)
    for name in config.policies:
      figure = out["figures"][name]
      for task in config.tasks:
        recs = [r for r in out["samples"] if r["task"] == task]
        want = ruler.score_task(ruler.metric_of(task), [r["predictions"][name]["text"] for r in recs],
                                [r["outputs"] for r in recs])
        self.assertEqual(figure["scores"][task]["384"], want)
      self.assertAlmostEqual(figure["mean"], figure["scores"]["niah_single_1"]["384"])
    json.dumps(out)
    units = runs.RunDir(run_dir).finished_units()
    self.assertLen(units, 1)
    # a resumed run recomputes nothing: the model is not called (a model without params would fail)
    again = ruler_job.run(config, run_dir, model=dataclasses.replace(model, params=None))
    self.assertEqual(again["figures"], out["figures"])


if __name__ == "__main__":
  absltest.main()
