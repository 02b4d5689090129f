"""Offline ACT tasks, generated from word lists and small embedded tables (`OFFLINE_TASKS`), deterministic
per seed, with disjoint calibration and evaluation splits."""

from __future__ import annotations

import random
from typing import Callable

from lacax.act.tasks.base import MCItem, Task, format_mc
from lacax.act.tasks.reference import ANSWER_INSTRUCTION, SST2_INSTRUCTION  # the reference's instructions
from lacax.eval.zero_shot import Example


_POSITIVE = ("wonderful", "excellent", "delightful", "great", "amazing", "lovely", "brilliant", "superb",
             "fantastic", "charming", "enjoyable", "beautiful")
_NEGATIVE = ("terrible", "awful", "boring", "dreadful", "horrible", "disappointing", "poor", "bad", "dull",
             "miserable", "ugly", "annoying")
_THINGS = ("movie", "film", "book", "meal", "concert", "hotel", "service", "show", "game", "trip", "restaurant",
           "album")
_PLAIN = ("The {thing} was {adj}.", "What a {adj} {thing}!", "This {thing} is really {adj}.",
          "I thought the {thing} was {adj}.", "Honestly, the {thing} felt {adj} from start to finish.",
          "Everyone agreed the {thing} was {adj}.")
_NEGATED = ("The {thing} was not {adj}.", "I did not think the {thing} was {adj}.",
            "Nobody would call the {thing} {adj}.")


def _sentiment(rng: random.Random) -> Example:
  """SST-2-style sentiment; half the sentences are negated ("was not great" is negative)."""
  label, negated = rng.randrange(2), rng.random() < 0.5
  words = _POSITIVE if bool(label) != negated else _NEGATIVE
  sentence = rng.choice(_NEGATED if negated else _PLAIN).format(thing=rng.choice(_THINGS), adj=rng.choice(words))
  return Example(SST2_INSTRUCTION + f"Sentence: {sentence}\nSentiment:", label, (" negative", " positive"),
                 "label_words", "sentiment")


_TOPICS = {
    "World": ("The {a} president met {b} leaders to discuss the peace treaty.",
              "Elections in the {a} capital were delayed after protests.",
              "The United Nations sent aid to {a} villages after the earthquake.",
              "{A} and {B} diplomats signed a new border agreement."),
    "Sports": ("The {a} football team won the championship final.",
               "A late goal gave the {a} club a victory over the {b} side in the league match.",
               "The {a} tennis star reached the semifinal.",
               "The coach praised his {a} players after the marathon."),
    "Business": ("Shares of the {a} bank fell after weak quarterly profits.",
                 "The {a} company reported record revenue and raised its dividend.",
                 "Oil prices rose as {a} markets reacted to the merger.",
                 "{A} investors sold stocks as interest rates climbed."),
    "Technology": ("A new smartphone chip from a {a} firm doubles battery life.",
                   "The {a} software update fixes a security flaw in the browser.",
                   "{A} researchers built a faster computer processor.",
                   "The internet company launched an app for {a} users."),
}
_NATIONALITIES = ("French", "German", "Japanese", "Brazilian", "Kenyan", "Indian", "Canadian", "Mexican", "Italian",
                  "Korean")


_WHEN = ("", " on Monday", " on Friday", " this week", " last night", " today")


def _topic(rng: random.Random) -> Example:
  """AGNews-style topic of a templated headline."""
  names = list(_TOPICS)
  label = rng.randrange(len(names))
  a, b = rng.sample(_NATIONALITIES, 2)
  sentence = rng.choice(_TOPICS[names[label]]).format(a=a, b=b, A=a, B=b)
  sentence = sentence[:-1] + rng.choice(_WHEN) + "."
  return Example("Classify the news articles into the categories of 'World', 'Sports', 'Business', or "
                 f"'Technology'.\n\nArticle: {sentence}\nCategory:", label, tuple(" " + n for n in names),
                 "label_words", "topic")


_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "England": "London", "Greece": "Athens", "Canada": "Ottawa",
    "Australia": "Canberra", "India": "New Delhi", "Mexico": "Mexico City", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Austria": "Vienna",
    "Kenya": "Nairobi", "Argentina": "Buenos Aires", "Peru": "Lima", "Turkey": "Ankara", "Thailand": "Bangkok",
    "South Korea": "Seoul", "Cuba": "Havana", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Hungary": "Budapest",
}
_QUESTION_TYPES = {
    "Person": ("Who wrote the novel {book}?", "Who was the first president of {country}?",
               "Who invented the {device}?", "Who painted the famous portrait in the {city} museum?",
               "Who is the current mayor of {city}?", "Who was the first person to own a {device}?"),
    "Location": ("Where is the city of {city} located?", "Where can you find the largest {device} museum?",
                 "In which country is {city}?", "Where did the {device} first go on sale?",
                 "Where does the {animal} live in {country}?", "Where was the novel {book} written?"),
    "Number": ("How many people live in {city}?", "How many legs does a {animal} have?",
               "What year was the {device} invented?", "How many islands belong to {country}?",
               "How many pages does the novel {book} have?", "How much does a {device} cost in {country}?"),
}
_BOOKS = ("Dracula", "Emma", "Ulysses", "Frankenstein", "Moby Dick", "Hamlet", "Don Quixote", "Jane Eyre",
          "War and Peace", "Middlemarch")
_DEVICES = ("telephone", "radio", "camera", "bicycle", "television", "computer", "microwave", "typewriter",
            "refrigerator", "compass")
_SMALL_ANIMALS = ("spider", "dog", "bird", "ant", "crab", "horse", "frog", "beetle", "lizard", "cat")


def _question_type(rng: random.Random) -> Example:
  """TREC-style question type (three coarse classes)."""
  names = list(_QUESTION_TYPES)
  label = rng.randrange(len(names))
  question = rng.choice(_QUESTION_TYPES[names[label]]).format(
      book=rng.choice(_BOOKS), country=rng.choice(list(_CAPITALS)), device=rng.choice(_DEVICES),
      city=rng.choice(list(_CAPITALS.values())), animal=rng.choice(_SMALL_ANIMALS))
  return Example("Classify the given questions into the following categories of 'Person', 'Location', or "
                 f"'Number'.\n\nQuestion: {question}\nType:", label, tuple(" " + n for n in names), "label_words",
                 "question_type")


_ANIMALS = {
    "mammal": ("dog", "cat", "horse", "cow", "whale", "lion", "tiger", "elephant", "rabbit", "monkey", "bear",
               "mouse", "goat", "sheep", "dolphin", "wolf", "fox", "deer", "giraffe", "zebra"),
    "bird": ("eagle", "sparrow", "parrot", "owl", "penguin", "duck", "pigeon", "crow", "swan", "chicken", "robin",
             "hawk", "falcon", "seagull", "flamingo", "peacock", "ostrich", "goose", "woodpecker", "canary"),
    "fish": ("salmon", "tuna", "shark", "trout", "cod", "goldfish", "carp", "sardine", "herring", "catfish", "eel",
             "mackerel", "pike", "perch", "haddock", "swordfish", "anchovy", "halibut", "bass", "piranha"),
    "insect": ("ant", "bee", "butterfly", "mosquito", "fly", "beetle", "wasp", "grasshopper", "cockroach", "moth",
               "ladybug", "cricket", "termite", "dragonfly", "flea", "hornet", "locust", "firefly", "aphid",
               "caterpillar"),
}
_ANIMAL_SENTENCES = ("{article} {animal} was seen near the river.", "We watched {article} {animal} in the park.",
                     "The children drew {article} {animal} at school.", "There is {article} {animal} in the picture.",
                     "My neighbour saw {article} {animal} yesterday.",
                     "The book has a chapter about {article} {animal}.",
                     "A photographer found {article} {animal} in the morning.",
                     "Our teacher talked about {article} {animal} today.")


def _animal_class(rng: random.Random) -> Example:
  """Animal class from its name in a neutral sentence (four classes)."""
  names = list(_ANIMALS)
  label = rng.randrange(len(names))
  animal = rng.choice(_ANIMALS[names[label]])
  article = "an" if animal[0] in "aeiou" else "a"
  sentence = rng.choice(_ANIMAL_SENTENCES).format(article=article, animal=animal)
  sentence = sentence[0].upper() + sentence[1:]
  return Example("Classify the animal into one of the following categories: 'mammal', 'bird', 'fish', or "
                 f"'insect'.\n\nSentence: {sentence}\nAnimal class:", label, tuple(" " + n for n in names),
                 "label_words", "animal_class")


def _capitals(rng: random.Random) -> MCItem:
  """Capital of a country, four options from the embedded table."""
  country = rng.choice(list(_CAPITALS))
  options = [_CAPITALS[country]] + [_CAPITALS[c] for c in rng.sample([c for c in _CAPITALS if c != country], 3)]
  rng.shuffle(options)
  return MCItem(ANSWER_INSTRUCTION, f"What is the capital of {country}?", tuple(options), options.index(_CAPITALS[country]),
                lead_in=f" The capital of {country} is")


def _larger(rng: random.Random) -> MCItem:
  """Which of two two-digit numbers (different tens digits) is larger."""
  while True:
    a, b = rng.sample(range(10, 100), 2)
    if a // 10 != b // 10:
      break
  return MCItem(ANSWER_INSTRUCTION, f"Which number is larger, {a} or {b}?", (str(a), str(b)), int(b > a),
                lead_in=" The larger number is ", option_prefix="")


def _arithmetic(rng: random.Random) -> MCItem:
  """a + b with a two-digit sum; four options with different tens digits (the digit the model must choose)."""
  a, b = rng.randint(10, 49), rng.randint(10, 49)
  answer = a + b
  tens = rng.sample([t for t in range(1, 10) if t != answer // 10], 3)
  options = [answer] + [10 * t + answer % 10 for t in tens]
  rng.shuffle(options)
  return MCItem(ANSWER_INSTRUCTION, f"What is {a} + {b}?", tuple(str(o) for o in options), options.index(answer),
                lead_in=f" {a} + {b} = ", option_prefix="")


OFFLINE_TASKS: dict[str, tuple[str, Callable[[random.Random], Example | MCItem]]] = {
    "sentiment": ("classification", _sentiment),
    "topic": ("classification", _topic),
    "question_type": ("classification", _question_type),
    "animal_class": ("classification", _animal_class),
    "capitals": ("multiple_choice", _capitals),
    "larger": ("multiple_choice", _larger),
    "arithmetic": ("multiple_choice", _arithmetic),
}


def offline_task(name: str, *, num_calibration: int = 200, num_evaluation: int = 300, seed: int = 0,
                 scoring: str | None = None) -> Task:
  """A generated task: `num_calibration` + `num_evaluation` distinct prompts, split in that order.

  Args:
    name: a key of `OFFLINE_TASKS`.
    num_calibration, num_evaluation: split sizes (>= 0).
    seed: generation seed; the same seed gives the same examples.
    scoring: multiple-choice tasks only: "options" (default), "letters" or "generate" (reference letter format).

  Raises:
    ValueError: unknown name or scoring, or the template space has fewer distinct prompts than requested.
  """
  if name not in OFFLINE_TASKS:
    raise ValueError(f"offline task {name!r} is unknown; expected one of {sorted(OFFLINE_TASKS)}")
  if num_calibration < 0 or num_evaluation < 0:
    raise ValueError(f"num_calibration={num_calibration} and num_evaluation={num_evaluation} must be >= 0")
  kind, generate = OFFLINE_TASKS[name]
  if kind == "classification" and scoring not in (None, "label_words"):
    raise ValueError(f"scoring={scoring!r}: offline classification task {name!r} is scored by 'label_words'")
  rng = random.Random(f"{name}:{seed}")
  wanted = num_calibration + num_evaluation
  examples: dict[str, Example] = {}
  for _ in range(50 * wanted + 100):
    if len(examples) == wanted:
      break
    drawn = generate(rng)
    example = drawn if isinstance(drawn, Example) else format_mc(drawn, scoring or "options", name)
    examples.setdefault(example.prompt, example)
  if len(examples) < wanted:
    raise ValueError(f"offline task {name!r} yields only {len(examples)} distinct prompts; requested "
                     f"num_calibration + num_evaluation = {wanted}")
  ordered = tuple(examples.values())
  return Task(name, kind, ordered[:num_calibration], ordered[num_calibration:])
