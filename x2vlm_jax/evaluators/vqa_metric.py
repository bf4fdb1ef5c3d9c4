"""VQA accuracy as the official VQA evaluation computes it (docs/finetuning.md#vqa-accuracy).

Score of one prediction against the annotators' answers (10 in VQA v2): for every annotator,
min(1, #other annotators who gave the predicted answer / 3), averaged over the annotators --
the leave-one-out form of the usual min(#humans / 3, 1) (a prediction 3 annotators gave scores
0.9, one 4 or more gave scores 1).

Before matching, the prediction is normalised: newlines / tabs -> spaces, stripped, then
`process_punctuation` and `process_digit_article`. The annotators' answers are only passed
through `process_punctuation`, and only when they are not all the same (the official quirk; the
VQA annotation files hold already-normalised answers).

  process_punctuation     ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !  are deleted where they
                          touch a space or the text has a digit,digit comma ("1,000"), else
                          replaced by a space; then every '.' not followed by a digit is removed
                          (at most 32, the official regex call passes re.UNICODE as its count)
  process_digit_article   lower case; number words none / zero ... ten -> 0 ... 10; the
                          articles a / an / the dropped; contractions written without one of
                          their apostrophes get it back (dont -> don't, youd've -> you'd've); the
                          official table's capitalised I-forms (Im, Ive) never match lower-cased
                          text and are left out
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@")
_PUNCT = _PUNCT + ("`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = ("none", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
NUMBER_WORDS = {w: str(max(i - 1, 0)) for i, w in enumerate(_NUMBERS)} | {"nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Contractions as written; each form with exactly one apostrophe missing maps back to it.
_CONTRACTIONS = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't
hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am
mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've
should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd
someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll
who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've
you'd you'd've you'll you're you've""".split()


def _without_one_apostrophe(word: str) -> list[str]:
  return [word[:i] + word[i + 1 :] for i, c in enumerate(word) if c == "'"]


CONTRACTIONS = {v: w for w in _CONTRACTIONS for v in _without_one_apostrophe(w)}


def process_punctuation(text: str) -> str:
  """The official punctuation rule (module docstring)."""
  out = text
  digit_comma = _DIGIT_COMMA.search(text) is not None
  for p in _PUNCT:
    if p + " " in text or " " + p in text or digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out, count=32)


def process_digit_article(text: str) -> str:
  """The official number-word / article / contraction rule (module docstring)."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_prediction(answer: str) -> str:
  """A predicted answer as the official evaluation compares it."""
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """The official VQA accuracy of one prediction (module docstring), in [0, 1]."""
  if not answers:
    raise ValueError("vqa_accuracy needs the annotators' answers")
  pred = normalize_prediction(prediction)
  gts = list(answers)
  if len(set(gts)) > 1:
    gts = [process_punctuation(g) for g in gts]
  scores = [
    min(1.0, sum(1 for j, g in enumerate(gts) if j != i and g == pred) / 3.0)
    for i in range(len(gts))
  ]
  return sum(scores) / len(scores)


def evaluate_vqa(
  predictions: Sequence[str], answers: Sequence[Sequence[str]], prefix: str = "eval/vqa"
) -> dict[str, float]:
  """Accuracy (percent) of the predictions, and the majority baseline: always answering the
  evaluated questions' most frequent annotator answer."""
  if len(predictions) != len(answers) or not answers:
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
  acc = sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers)) / len(answers)
  counts: dict[str, int] = {}
  for gts in answers:
    for g in gts:
      counts[g] = counts.get(g, 0) + 1
  majority = max(counts, key=counts.get)
  base = sum(vqa_accuracy(majority, a) for a in answers) / len(answers)
  return {
    f"{prefix}/acc": 100.0 * acc,
    f"{prefix}/acc_majority": 100.0 * base,
    f"{prefix}/num_questions": float(len(answers)),
  }
