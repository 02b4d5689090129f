"""LongBench metrics, aggregation, prompts and loader on fixed inputs with hand-computed values.

The metric implementations were also checked for exact (bitwise) equality with the official ``metrics.py`` and
``eval.py`` running on rouge 1.0.1, fuzzywuzzy 0.18.0 (pure-python path) and jieba 0.42.1 over thousands of
random strings; `OfficialParityTest` repeats a small version of that check (rouge and fuzzywuzzy are in the
`test` extra, so it always runs).
"""

import json
import math
import os
import random
import tempfile

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from lacax.eval import longbench as lb


def chars(text):
  """A stand-in word segmenter (one word per character) so the Chinese metrics run without jieba."""
  return list(text)


class NormalizationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # lower -> drop ASCII punctuation -> drop articles -> squeeze spaces.
      ("articles_and_punct", "The Cat's hat!", "cats hat"),
      ("articles_inside_words_stay", "Theater and another", "theater and another"),
      ("punct_removed_before_articles", "the-end", "theend"),  # "the-end" -> "theend": no article left.
      ("article_made_by_punct_removal", "a.b. an", "ab"),  # "a.b. an" -> "ab an" -> "ab " -> "ab".
      ("unicode_punct_kept", "Cat’s", "cat’s"),  # ’ (U+2019) is not in string.punctuation.
      ("whitespace", "  New\tYork \n City ", "new york city"),
      ("only_articles", "A an THE", ""),
  )
  def test_normalize_answer(self, text, expected):
    self.assertEqual(lb.normalize_answer(text), expected)

  @parameterized.named_parameters(
      ("cjk_punct", "北京，中国。", "北京中国"),
      ("ascii_punct_and_spaces", "Hello, World 2!", "helloworld2"),  # all whitespace removed, not squeezed.
      ("fullwidth", "（答案）：是", "答案是"),
  )
  def test_normalize_zh_answer(self, text, expected):
    self.assertEqual(lb.normalize_zh_answer(text), expected)


class QaF1Test(parameterized.TestCase):

  @parameterized.named_parameters(
      # pred -> "eiffel tower in paris" (4 tokens), gold -> "eiffel tower" (2): overlap 2,
      # P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
      ("partial", "The Eiffel Tower, in Paris.", "Eiffel Tower", 2 / 3),
      ("exact_after_normalisation", "the PARIS!", "Paris", 1.0),
      # Multiset overlap: pred "x x y" vs gold "x y y": common = {x:1, y:1} = 2, P = R = 2/3, F1 = 2/3.
      ("multiset", "x x y", "x y y", 2 / 3),
      ("no_overlap", "London", "Berlin", 0.0),
      ("empty_prediction", "", "Berlin", 0.0),
      ("only_articles_vs_word", "the", "the end", 0.0),  # pred normalises to "" -> no tokens.
  )
  def test_qa_f1(self, prediction, gold, expected):
    self.assertAlmostEqual(lb.qa_f1_score(prediction, gold), expected, places=12)

  def test_qa_f1_zh_with_char_segmenter(self):
    # Characters as words: pred ["北","京","是","首","都"] (。 dropped), gold ["北","京"]: overlap 2,
    # P = 2/5, R = 1, F1 = 2 * 0.4 / 1.4 = 4/7.
    self.assertAlmostEqual(lb.qa_f1_zh_score("北京是首都。", "北京", cut=chars), 4 / 7, places=12)
    # Punctuation-only words vanish: pred ["北","京"] after dropping "，", exact match.
    self.assertEqual(lb.qa_f1_zh_score("北，京", "北京", cut=chars), 1.0)

  def test_zh_metrics_name_the_missing_package(self):
    try:
      import jieba  # pylint: disable=import-outside-toplevel,unused-import
      self.skipTest("jieba is installed")
    except ImportError:
      pass
    with self.assertRaisesRegex(ImportError, r"pip install jieba"):
      lb.qa_f1_zh_score("北京", "北京")
    with self.assertRaisesRegex(ImportError, r"pip install jieba"):
      lb.score_task("dureader", ["北京"], [["北京"]])


class RougeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # Distinct words: ref {the,cat,is,on,mat} m=5, pred {the,cat,sat,on,mat} n=5; LCS "the cat on the mat"
      # has distinct words {the,cat,on,mat} = 4. R = P = 0.8, F = 2 * 0.64 / (1.6 + 1e-8).
      ("distinct_words_not_tokens", "the cat sat on the mat", "the cat is on the mat", 2 * 0.64 / (1.6 + 1e-8)),
      # Sentences "a b" | "c d" vs "a c" | "b d": LCS word sets {a},{c},{b},{d} -> union of 4 = m = n.
      # R = P = 1, F = 2 / (2 + 1e-8): order across sentences is ignored.
      ("sentence_union", "a b. c d", "a c. b d", 2 / (2 + 1e-8)),
      # "ok. " -> sentences ["ok", " "] -> words ["ok"], [""]: n = |{ok, ""}| = 2, m = 1, LCS_u = 1.
      # R = 1, P = 0.5, F = 2 * 0.5 / (1.5 + 1e-8).
      ("whitespace_sentence_is_a_word", "ok. ", "ok", 2 * 0.5 / (1.5 + 1e-8)),
      # Case and commas matter: "The" != "the"; m = 2 {the, cat}, n = 3 {The, cat, ""}: LCS_u = {cat} = 1.
      # R = 1/2, P = 1/3, F = 2 * (1/6) / (5/6 + 1e-8).
      ("case_sensitive", "The cat. ", "the cat", 2 * (1 / 6) / (5 / 6 + 1e-8)),
      ("identical", "we met. it rained", "we met. it rained", 2 / (2 + 1e-8)),
      ("disjoint", "x y", "z", 0.0),
      ("empty_prediction", "", "the cat", 0.0),
      ("only_dots", "...", "the cat", 0.0),  # no sentence survives -> rouge raises -> official 0.0
      ("empty_reference", "the cat", "", 0.0),
  )
  def test_rouge_l(self, prediction, gold, expected):
    self.assertAlmostEqual(lb.rouge_score(prediction, gold), expected, places=12)

  def test_lcs_tie_break_picks_the_reference_path(self):
    # ref "a b" vs pred sentences "b a" and "b". For "b a" both {a} and {b} are LCSs; rouge's back-track
    # (x = ref, y = pred) at (2,2): b != a, table[1][2] = 1 is not > table[2][1] = 1 -> step left to (2,1):
    # b == b -> {b}. The second pair also gives {b}, so LCS_u = 1 (not 2 as the {a} path would give).
    # m = 2, n = |{b, a}| = 2: R = P = 1/2, F = 2 * 0.25 / (1 + 1e-8).
    self.assertEqual(lb._lcs_words(["a", "b"], ["b", "a"]), {"b"})
    self.assertAlmostEqual(lb.rouge_score("b a. b", "a b"), 2 * 0.25 / (1 + 1e-8), places=12)

  def test_long_sentence_is_scored(self):
    # 700 + 700 words without a ".": rouge 1.0.1 recurses past Python's limit and the official code returns
    # 0.0; ours is iterative. LCS = w0 w2 ... w698 = 350 words; m = n = 700: R = P = 0.5.
    pred = " ".join(f"w{i}" for i in range(700))
    ref = " ".join(f"w{i}" for i in range(0, 1400, 2))
    self.assertAlmostEqual(lb.rouge_score(pred, ref), 2 * 0.25 / (1 + 1e-8), places=12)

  def test_rouge_zh_with_char_segmenter(self):
    # "我 爱 北 京" vs "我 爱 上 海": m = n = 4, LCS {我, 爱} = 2 -> R = P = 0.5, F = 0.5 / (1 + 1e-8).
    self.assertAlmostEqual(lb.rouge_zh_score("我爱北京", "我爱上海", cut=chars), 0.5 / (1 + 1e-8), places=12)


class ClassificationRetrievalCountTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("single_match", "Type: Location", "Location", ["Location", "Person", "Number"], 1.0),
      # Two classes appear, gold among them: 1/2.
      ("two_matches", "Person or Location", "Location", ["Location", "Person", "Number"], 0.5),
      ("gold_absent", "Person", "Location", ["Location", "Person"], 0.0),
      # "city" is a strict substring of the gold "capital city" and is discarded: 1/1.
      ("substring_of_gold_discarded", "capital city", "capital city", ["city", "capital city"], 1.0),
      # Official quirk: ["new", "york", "new york"] all match; "new" is removed while iterating, which skips
      # "york" (it shifts into the visited slot), so 2 matches remain -> 1/2, not 1.
      ("remove_while_iterating_quirk", "new york", "new york", ["new", "york", "new york"], 0.5),
  )
  def test_classification(self, prediction, gold, classes, expected):
    self.assertEqual(lb.classification_score(prediction, gold, all_classes=classes), expected)

  def test_classification_needs_classes(self):
    with self.assertRaisesRegex(ValueError, "all_classes"):
      lb.classification_score("x", "x")

  @parameterized.named_parameters(
      # Numbers 3, 12, 3: two equal the gold id 3 -> 2/3.
      ("en", lb.retrieval_score, "Paragraph 3 and Paragraph 12, maybe 3", "Paragraph 3", 2 / 3),
      ("en_no_numbers", lb.retrieval_score, "I do not know", "Paragraph 3", 0.0),
      ("en_prefix_number_differs", lb.retrieval_score, "Paragraph 30", "Paragraph 3", 0.0),  # "30" != "3"
      ("zh", lb.retrieval_zh_score, "答案是段落5", "段落5", 1.0),
      # Numbers 7, 10: one equals the gold count -> 1/2.
      ("count", lb.count_score, "There are 7 unique paragraphs out of 10", "7", 0.5),
      ("count_none", lb.count_score, "many", "7", 0.0),
  )
  def test_share_of_numbers(self, metric, prediction, gold, expected):
    self.assertAlmostEqual(metric(prediction, gold), expected, places=12)

  def test_retrieval_gold_without_id_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "Paragraph <number>"):
      lb.retrieval_score("Paragraph 1", "the first one")


class CodeSimTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # "return x + 1" vs "return x + 2": difflib matches "return x + " (11 chars); 2 * 11 / 24 = 0.9167 -> 92.
      ("one_char_differs", "return x + 1", "return x + 2", 92, 92),
      # Only "a" matches: 2 * 1 / 16 = 0.125 -> 12.5, which Python 3 rounds half to even -> 12 (not 13).
      ("round_half_even", "axxxxxxx", "ayyyyyyy", 12, 12),
      # Every common substring has length 1; difflib takes the earliest one in a: a[0] = "c" = b[3], after which
      # nothing remains to its right in b: M = 1, 2 / 8 -> 25. The LCS is "bb": 2 * 2 / 8 -> 50 for indel.
      ("difflib_is_not_lcs", "cbbb", "babc", 25, 50),
      ("equal", "abc", "abc", 100, 100),
      ("both_empty_are_equal", "", "", 100, 100),  # the equality check precedes the empty check
      ("one_empty", "", "abc", 0, 0),
  )
  def test_fuzz_ratio(self, a, b, expected_difflib, expected_indel):
    self.assertEqual(lb.fuzz_ratio(a, b), expected_difflib)
    self.assertEqual(lb.fuzz_ratio(a, b, matcher="indel"), expected_indel)

  def test_code_sim_takes_first_code_line(self):
    # Leading newlines stripped; "```python" (backtick) and "# comment" are skipped; "return x + 1" is scored
    # against the gold line: 92 / 100.
    prediction = "\n\n```python\n# comment\nreturn x + 1\nprint(x)"
    self.assertEqual(lb.code_sim_score(prediction, "return x + 2"), 0.92)
    # A "//" line is skipped too.
    self.assertEqual(lb.code_sim_score("// js comment\nfoo();", "foo();"), 1.0)
    # No code line at all -> the empty string is compared -> 0.
    self.assertEqual(lb.code_sim_score("# only\n`x`", "foo();"), 0.0)

  def test_unknown_matcher(self):
    with self.assertRaisesRegex(ValueError, "matcher"):
      lb.fuzz_ratio("a", "b", matcher="levenshtein")


class TablesTest(absltest.TestCase):

  def test_every_task_has_metric_prompt_and_length(self):
    self.assertLen(lb.TASKS, 21)
    for table in (lb.TASK_METRICS, lb.PROMPT_TEMPLATES, lb.MAX_NEW_TOKENS):
      self.assertEqual(set(table), set(lb.TASKS))
    self.assertTrue(set(lb.LONGBENCH_E_TASKS) <= set(lb.TASKS))
    self.assertLen(lb.LONGBENCH_E_TASKS, 13)

  def test_metric_families(self):
    families = {}
    for task, metric in lb.TASK_METRICS.items():
      families.setdefault(metric.__name__, set()).add(task)
    self.assertEqual(families["rouge_score"], {"gov_report", "qmsum", "multi_news", "samsum"})
    self.assertEqual(families["rouge_zh_score"], {"dureader", "vcsum"})
    self.assertEqual(families["classification_score"], {"trec", "lsht"})
    self.assertEqual(families["code_sim_score"], {"lcc", "repobench-p"})
    self.assertEqual(families["qa_f1_zh_score"], {"multifieldqa_zh"})
    self.assertLen(families["qa_f1_score"], 7)

  def test_templates_and_lengths_spot_checks(self):
    self.assertEqual(lb.PROMPT_TEMPLATES["lcc"],
                     "Please complete the code given below. \n{context}Next line of code:\n")
    self.assertIn("asconcisely", lb.PROMPT_TEMPLATES["narrativeqa"])  # the official typo is kept
    self.assertEqual((lb.MAX_NEW_TOKENS["gov_report"], lb.MAX_NEW_TOKENS["hotpotqa"]), (512, 32))
    for task, template in lb.PROMPT_TEMPLATES.items():
      self.assertIn("{context}", template, task)

  def test_chat_template_and_first_line_sets(self):
    self.assertEqual(lb.FIRST_LINE_TASKS, {"trec", "triviaqa", "samsum", "lsht"})
    self.assertFalse(lb.uses_chat_template("lcc"))
    self.assertFalse(lb.uses_chat_template("trec"))
    self.assertTrue(lb.uses_chat_template("qasper"))
    with self.assertRaisesRegex(ValueError, "unknown LongBench task 'qaspr'"):
      lb.uses_chat_template("qaspr")


class PromptTest(absltest.TestCase):

  def test_build_prompt(self):
    example = {"context": "CTX", "input": "Q?"}
    self.assertEqual(lb.build_prompt("trec", example),
                     "Please determine the type of the question below. Here are some examples of questions.\n\n"
                     "CTX\nQ?")
    self.assertEqual(lb.build_prompt("repobench-p", example),
                     "Please complete the code given below. \nCTXQ?Next line of code:\n")
    # Braces inside the data are not format fields.
    self.assertIn("{input}", lb.build_prompt("lcc", {"context": "{input}", "input": ""}))
    with self.assertRaisesRegex(KeyError, "'input'"):
      lb.build_prompt("qasper", {"context": "x"})

  def test_middle_truncate(self):
    ids = list(range(10))
    self.assertEqual(lb.middle_truncate(ids, 4), [0, 1, 8, 9])
    self.assertEqual(lb.middle_truncate(ids, 5), [0, 1, 8, 9])  # odd budget: 2 * (5 // 2) tokens, as official
    self.assertIs(lb.middle_truncate(ids, 10), ids)
    self.assertEqual(lb.middle_truncate(tuple(ids), 6), (0, 1, 2, 7, 8, 9))
    np.testing.assert_array_equal(lb.middle_truncate(np.arange(10), 4), [0, 1, 8, 9])
    with self.assertRaisesRegex(ValueError, "max_len must be an integer >= 2, got 1"):
      lb.middle_truncate(ids, 1)

  def test_truncate_prompt_round_trip(self):
    # Word-level "tokenizer": 6 words, budget 4 -> first 2 + last 2 words, decoded separately and concatenated.
    vocab = {}
    encode = lambda text: [vocab.setdefault(w, len(vocab)) for w in text.split(" ")]
    inverse = lambda: {i: w for w, i in vocab.items()}
    decode = lambda ids: " ".join(inverse()[i] for i in ids)
    self.assertEqual(lb.truncate_prompt("a b c d e f", 4, encode, decode), "a be f")
    self.assertEqual(lb.truncate_prompt("a b", 4, encode, decode), "a b")

  def test_first_line(self):
    self.assertEqual(lb.first_line("\n\nParis\nExplanation"), "Paris")
    self.assertEqual(lb.first_line(" Paris\n"), " Paris")  # only newlines are stripped


class AggregationTest(absltest.TestCase):

  def test_score_task_max_over_references_and_mean(self):
    # ex1: max(F1("paris","paris") = 1, F1("paris","paris france") = 2/3) = 1; ex2: 0 -> mean 0.5 -> 50.0.
    self.assertEqual(lb.score_task("hotpotqa", ["Paris", "London"], [["paris", "Paris, France"], ["Berlin"]]), 50.0)
    # Rounded to 2 decimals like the official scorer: (1 + 0 + 0) / 3 * 100 = 33.333... -> 33.33.
    self.assertEqual(lb.score_task("hotpotqa", ["a1", "b", "c"], [["a1"], ["x"], ["y"]]), 33.33)
    self.assertAlmostEqual(lb.score_task("hotpotqa", ["a1", "b", "c"], [["a1"], ["x"], ["y"]], ndigits=None),
                           100 / 3, places=12)

  def test_first_line_scoring(self):
    pred = "\nParis\nSome explanation"
    # triviaqa scores only "Paris": F1 = 1 -> 100.
    self.assertEqual(lb.score_task("triviaqa", [pred], [["Paris"]]), 100.0)
    # narrativeqa scores all of it: "paris some explanation" vs "paris": P = 1/3, R = 1, F1 = 0.5 -> 50.
    self.assertEqual(lb.score_task("narrativeqa", [pred], [["Paris"]]), 50.0)
    # trec: the second line would add a second matching class (1/2); the first line alone scores 1.
    self.assertEqual(lb.score_task("trec", ["Location\nPerson"], [["Location"]], ["Location", "Person"]), 100.0)

  def test_score_task_errors(self):
    with self.assertRaisesRegex(ValueError, "2 predictions but 1 answer lists"):
      lb.score_task("qasper", ["a", "b"], [["a"]])
    with self.assertRaisesRegex(ValueError, "no predictions"):
      lb.score_task("qasper", [], [])
    with self.assertRaisesRegex(TypeError, "sequence of reference strings"):
      lb.score_task("qasper", ["a"], ["a"])

  def test_score_longbench_average(self):
    results = {
        "qasper": [lb.PredictionRecord("yes", ("yes",)), lb.PredictionRecord("no", ("yes",))],  # 50.0
        "passage_count": [{"pred": "3", "answers": ["3"], "all_classes": None, "length": 10}],  # 100.0
    }
    scores = lb.score_longbench(results)
    self.assertEqual(scores, {"passage_count": 100.0, "qasper": 50.0, "average_score": 75.0})
    self.assertEqual(list(scores), ["passage_count", "qasper", "average_score"])  # sorted, average last

  def test_longbench_e_buckets(self):
    self.assertEqual([lb.length_bucket(n) for n in (0, 3999, 4000, 7999, 8000)],
                     ["0-4k", "0-4k", "4-8k", "4-8k", "8k+"])
    # 0-4k: scores 1, 0 -> 50; 4-8k: 1 -> 100; 8k+: empty -> NaN.
    buckets = lb.score_task_e("passage_count", ["3", "4", "5"], [["3"], ["3"], ["5"]], [100, 3999, 4000])
    self.assertEqual(buckets["0-4k"], 50.0)
    self.assertEqual(buckets["4-8k"], 100.0)
    self.assertTrue(math.isnan(buckets["8k+"]))
    records = {
        "passage_count": [lb.PredictionRecord("3", ("3",), None, 100),
                          lb.PredictionRecord("4", ("3",), None, 9000)],
        "qasper": [lb.PredictionRecord("yes", ("yes",), None, 200)],
    }
    scores = lb.score_longbench(records, longbench_e=True)
    # 0-4k: mean(100 (passage_count), 100 (qasper)) = 100; 8k+: only passage_count with 0; 4-8k: none -> NaN.
    self.assertEqual(scores["average_score"]["0-4k"], 100.0)
    self.assertEqual(scores["average_score"]["8k+"], 0.0)
    self.assertTrue(math.isnan(scores["average_score"]["4-8k"]))
    with self.assertRaisesRegex(ValueError, "record 0 has no 'length'"):
      lb.score_longbench({"qasper": [lb.PredictionRecord("a", ("a",))]}, longbench_e=True)


def _example(**overrides):
  record = {"input": "Q?", "context": "C", "answers": ["A"], "length": 12, "dataset": "qasper",
            "language": "en", "all_classes": None, "_id": "id0"}
  record.update(overrides)
  return record


class LoaderTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # tempfile rather than create_tempdir(): absl flags are not parsed under pytest.
    self.dir = self.enterContext(tempfile.TemporaryDirectory())

  def write(self, name, lines):
    path = os.path.join(self.dir, name)
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
                        for line in lines) + "\n")
    return path

  def test_loads_file_and_folder(self):
    self.write("qasper.jsonl", [_example(), "", _example(_id="id1", answers=["B", "C"])])  # blank line skipped
    self.write("trec_e.jsonl", [_example(dataset="trec_e", all_classes=["x", "y"])])
    self.write("result.json", ["{}"])
    data = lb.load_longbench(self.dir)
    self.assertEqual(list(data), ["qasper"])
    first, second = data["qasper"]
    self.assertEqual(first, lb.LongBenchExample("Q?", "C", ("A",), 12, "qasper", "en", None, "id0"))
    self.assertEqual(second.answers, ("B", "C"))
    e_data = lb.load_longbench(self.dir, longbench_e=True)
    self.assertEqual(e_data["trec"][0].all_classes, ("x", "y"))
    self.assertEqual(list(lb.load_longbench(os.path.join(self.dir, "trec_e.jsonl"))), ["trec"])

  def test_missing_named_task_file(self):
    self.write("qasper.jsonl", [_example()])
    with self.assertRaisesRegex(FileNotFoundError, r"task 'hotpotqa'.*hotpotqa\.jsonl"):
      lb.load_longbench(self.dir, tasks=["qasper", "hotpotqa"])
    with self.assertRaisesRegex(ValueError, "unknown LongBench task 'hotpot'"):
      lb.load_longbench(self.dir, tasks=["hotpot"])
    with self.assertRaisesRegex(FileNotFoundError, "_e.jsonl"):
      lb.load_longbench(self.dir, longbench_e=True)

  def test_bad_json_names_file_and_line(self):
    path = self.write("qasper.jsonl", [_example(), '{"input": "x",'])
    with self.assertRaises(lb.LongBenchFormatError) as ctx:
      lb.load_longbench_file(path)
    self.assertIn(f"{path}, line 2: invalid JSON", str(ctx.exception))
    self.assertEqual(ctx.exception.line, 2)

  def test_missing_field_names_file_line_and_field(self):
    bad = _example()
    del bad["answers"]
    path = self.write("qasper.jsonl", [_example(), _example(), bad])
    with self.assertRaises(lb.LongBenchFormatError) as ctx:
      lb.load_longbench(path)
    self.assertIn(f"{path}, line 3: missing field 'answers'", str(ctx.exception))
    self.assertEqual((ctx.exception.line, ctx.exception.field), (3, "answers"))

  def test_wrong_types(self):
    for field, value, expected in [("answers", "A", "a list of strings"), ("length", "12", "non-negative integer"),
                                   ("length", True, "non-negative integer"), ("all_classes", [1], "or null"),
                                   ("_id", 3, "a string, got int")]:
      path = self.write("qasper.jsonl", [_example(**{field: value})])
      with self.assertRaisesRegex(lb.LongBenchFormatError, f"line 1: field '{field}' must be.*{expected}"):
        lb.load_longbench_file(path)
    path = self.write("qasper.jsonl", ["[1, 2]"])
    with self.assertRaisesRegex(lb.LongBenchFormatError, "line 1: expected a JSON object, got list"):
      lb.load_longbench_file(path)

  def test_unknown_file_name(self):
    path = self.write("mydata.jsonl", [_example()])
    with self.assertRaisesRegex(ValueError, "cannot tell the LongBench task from the file name 'mydata.jsonl'"):
      lb.load_longbench(path)
    self.assertLen(lb.load_longbench_file(path), 1)  # the single-file reader needs no task name

  def test_load_predictions_and_score(self):
    self.write("qasper.jsonl", [{"pred": "yes", "answers": ["yes"], "all_classes": None, "length": 5},
                                {"pred": "no", "answers": ["yes"], "all_classes": None}])
    self.write("result.json", ["{}"])
    predictions = lb.load_predictions(self.dir)
    self.assertEqual(predictions["qasper"][1], lb.PredictionRecord("no", ("yes",), None, None))
    self.assertEqual(lb.score_longbench(predictions), {"qasper": 50.0, "average_score": 50.0})
    path = self.write("hotpotqa.jsonl", [{"answers": ["x"], "all_classes": None}])
    with self.assertRaisesRegex(lb.LongBenchFormatError, "line 1: missing field 'pred'"):
      lb.load_predictions(path)


class OfficialParityTest(absltest.TestCase):
  """Exact equality with the official scorers (rouge==1.0.1, fuzzywuzzy==0.18.0: the `test` extra)."""

  def test_rouge_and_fuzz_match_packages(self):
    import rouge  # pylint: disable=import-outside-toplevel
    from fuzzywuzzy import fuzz  # pylint: disable=import-outside-toplevel

    rng = random.Random(0)
    words = ["the", "cat", "Cat", "sat", "on", ".", ",", "mat", " ", "x", "y"]
    for _ in range(300):
      pred = " ".join(rng.choice(words) for _ in range(rng.randint(0, 25)))
      gold = " ".join(rng.choice(words) for _ in range(rng.randint(0, 25)))
      try:
        expected = rouge.Rouge().get_scores([pred], [gold], avg=True)["rouge-l"]["f"]
      except ValueError:
        expected = 0.0
      self.assertEqual(lb.rouge_score(pred, gold), expected, (pred, gold))
      # Only the pure-python (difflib) fuzzywuzzy path is comparable (python-Levenshtein is not installed).
      self.assertEqual(fuzz.SequenceMatcher.__module__, "difflib")
      self.assertEqual(lb.fuzz_ratio(pred, gold), fuzz.ratio(pred, gold), (pred, gold))


if __name__ == "__main__":
  absltest.main()
