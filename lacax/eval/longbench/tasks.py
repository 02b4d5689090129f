"""LongBench task tables: templates, decode lengths, metrics per task, the chat-template exceptions (facts of
THUDM/LongBench `config/*.json` and `pred.py`)."""

from __future__ import annotations





# --------------------------------------------------------------------------------------------------------------
# Task tables (facts from THUDM/LongBench `config/*.json` and `pred.py`, identical in GATECH-EIC/LaCache).
# --------------------------------------------------------------------------------------------------------------

TASKS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
    "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)
"""The 21 LongBench v1 tasks, in the official order."""

LONGBENCH_E_TASKS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
"""The 13 tasks that LongBench-E (length-balanced, files ``<task>_e.jsonl``) provides."""

FIRST_LINE_TASKS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})
"""Few-shot tasks whose prediction is cut to its first line before scoring (``eval.py``)."""

NO_CHAT_TEMPLATE_TASKS: frozenset[str] = FIRST_LINE_TASKS | {"lcc", "repobench-p"}
"""Tasks whose prompt is fed raw, without the model's chat template (``pred.py``).

This is the four first-line tasks *plus* the two code-completion tasks: ``pred.py`` skips ``build_chat`` for
trec, triviaqa, samsum, lsht, lcc and repobench-p, while ``eval.py`` cuts to the first line only for the first
four (code scoring picks its own line, see `code_sim_score`).
"""

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}
"""Task -> maximum number of generated tokens (``config/dataset2maxlen.json``)."""

LENGTH_BUCKETS: tuple[str, ...] = ("0-4k", "4-8k", "8k+")
"""LongBench-E length buckets over the example's ``length`` field: [0, 4000), [4000, 8000), [8000, inf)."""

# Reproduced character for character from `config/dataset2prompt.json`, typos included ("asconcisely"):
# a changed prompt would change the scores being compared against.
_MULTI_DOC_QA_TEMPLATE = (  # hotpotqa, 2wikimqa and musique share it.
    'Answer the question based on the given passages. Only give me the answer and do not output '
    'any other words.\n\n'
    'The following are given passages.\n'
    '{context}\n\n'
    'Answer the question based on the given passages. Only give me the answer and do not output '
    'any other words.\n\n'
    'Question: {input}\n'
    'Answer:'
)
PROMPT_TEMPLATES: dict[str, str] = {
  'narrativeqa': (
      'You are given a story, which can be either a novel or a movie script, and a question. Answer '
      'the question asconcisely as you can, using a single phrase if possible. Do not provide any '
      'explanation.\n\n'
      'Story: {context}\n\n'
      'Now, answer the question based on the story asconcisely as you can, using a single phrase '
      'if possible. Do not provide any explanation.\n\n'
      'Question: {input}\n\n'
      'Answer:'
  ),
  'qasper': (
      'You are given a scientific article and a question. Answer the question as concisely as you '
      'can, using a single phrase or sentence if possible. If the question cannot be answered based '
      'on the information in the article, write "unanswerable". If the question is a yes/no question, '
      'answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\n'
      'Article: {context}\n\n'
      ' Answer the question based on the above article as concisely as you can, using a single '
      'phrase or sentence if possible. If the question cannot be answered based on the information '
      'in the article, write "unanswerable". If the question is a yes/no question, answer "yes", '
      '"no", or "unanswerable". Do not provide any explanation.\n\n'
      'Question: {input}\n\n'
      'Answer:'
  ),
  'multifieldqa_en': (
      'Read the following text and answer briefly.\n\n'
      '{context}\n\n'
      'Now, answer the following question based on the above text, only give me the answer and '
      'do not output any other words.\n\n'
      'Question: {input}\n'
      'Answer:'
  ),
  'multifieldqa_zh': (
      '阅读以下文字并用中文简短回答：\n\n'
      '{context}\n\n'
      '现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n'
      '问题：{input}\n'
      '回答：'
  ),
  'hotpotqa': _MULTI_DOC_QA_TEMPLATE,
  '2wikimqa': _MULTI_DOC_QA_TEMPLATE,
  'musique': _MULTI_DOC_QA_TEMPLATE,
  'dureader': (
      '请基于给定的文章回答下述问题。\n\n'
      '文章：{context}\n\n'
      '请基于上述文章回答下面的问题。\n\n'
      '问题：{input}\n'
      '回答：'
  ),
  'gov_report': (
      'You are given a report by a government agency. Write a one-page summary of the report.\n\n'
      'Report:\n'
      '{context}\n\n'
      'Now, write a one-page summary of the report.\n\n'
      'Summary:'
  ),
  'qmsum': (
      'You are given a meeting transcript and a query containing a question or instruction. Answer '
      'the query in one or more sentences.\n\n'
      'Transcript:\n'
      '{context}\n\n'
      'Now, answer the query based on the above meeting transcript in one or more sentences.\n\n'
      'Query: {input}\n'
      'Answer:'
  ),
  'multi_news': (
      'You are given several news passages. Write a one-page summary of all news. \n\n'
      'News:\n'
      '{context}\n\n'
      'Now, write a one-page summary of all the news.\n\n'
      'Summary:'
  ),
  'vcsum': (
      '下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n'
      '会议记录：\n'
      '{context}\n\n'
      '会议总结：'
  ),
  'trec': (
      'Please determine the type of the question below. Here are some examples of questions.\n\n'
      '{context}\n'
      '{input}'
  ),
  'triviaqa': (
      'Answer the question based on the given passage. Only give me the answer and do not output '
      'any other words. The following are some examples.\n\n'
      '{context}\n\n'
      '{input}'
  ),
  'samsum': (
      'Summarize the dialogue into a few short sentences. The following are some examples.\n\n'
      '{context}\n\n'
      '{input}'
  ),
  'lsht': (
      '请判断给定新闻的类别，下面是一些例子。\n\n'
      '{context}\n'
      '{input}'
  ),
  'passage_count': (
      'There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. '
      'Please carefully read these paragraphs and determine how many unique paragraphs there are '
      'after removing duplicates. In other words, how many non-repeating paragraphs are there in '
      'total?\n\n'
      '{context}\n\n'
      'Please enter the final count of unique paragraphs after removing duplicates. The output '
      'format should only contain the number, such as 1, 2, 3, and so on.\n\n'
      'The final answer is: '
  ),
  'passage_retrieval_en': (
      'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph '
      'the abstract is from.\n\n'
      '{context}\n\n'
      'The following is an abstract.\n\n'
      '{input}\n\n'
      'Please enter the number of the paragraph that the abstract is from. The answer format must '
      'be like "Paragraph 1", "Paragraph 2", etc.\n\n'
      'The answer is: '
  ),
  'passage_retrieval_zh': (
      '以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n'
      '{context}\n\n'
      '下面是一个摘要\n\n'
      '{input}\n\n'
      '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n'
      '答案是：'
  ),
  'lcc': (
      'Please complete the code given below. \n'
      '{context}Next line of code:\n'
  ),
  'repobench-p': (
      'Please complete the code given below. \n'
      '{context}{input}Next line of code:\n'
  ),
}
"""Task -> prompt template with ``{context}`` and ``{input}`` fields (``config/dataset2prompt.json``)."""


def check_task(task: str) -> str:
  """Returns ``task`` if it is a LongBench v1 task name, else raises ValueError naming the known tasks."""
  if task not in MAX_NEW_TOKENS:
    raise ValueError(f"unknown LongBench task {task!r}; expected one of {', '.join(TASKS)}")
  return task


def uses_chat_template(task: str) -> bool:
  """Whether the official ``pred.py`` wraps this task's prompt in the model's chat template."""
  return check_task(task) not in NO_CHAT_TEMPLATE_TASKS
