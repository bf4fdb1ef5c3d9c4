"""Per-example builders of the question-answering and NLVR2 fine-tuning tasks
(`PreprocConfig.task_fields`; `examples.make_example` hands such records here).

Records come from `task_sources.py`. Every example has the kind's usual fields (the MLM fields
unmasked: mlm_ids = text_ids, no masked position) plus the task's (`features.task_spec`):

  vqa       pixels [R, R, 3]; question text fields; answer_ids / answer_mask [A, La] and
            answer_weights [A]: the A heaviest answers (ties in file order) as `[CLS] a [SEP]`
  nlvr2     pixels, pair_pixels [R, R, 3] (each image its own crop / flip / RandAugment, the
            official train transform); sentence text fields; label
  video_qa  frames [F, R, R, 3], frame_valid [F] (frames sampled as in video retrieval, each
            transformed on its own, flip coin per frame); question text fields; label
  caption   pixels; the caption with inserted [MASK]s (caption_examples.py)

Official behaviour (docs/finetuning.md): questions are cleaned by `pre_question` (lower case,
punctuation -> space, first `max_tokens` words); VQA and video QA flip images with p 0.5 only
when neither the question nor an answer contains "left" / "right" (the VQA RandomResizedCrop
and RandAugment never flip); NLVR2 sentences go through `pre_caption` and both images may flip.
"""

from __future__ import annotations

import re

import numpy as np

from data_pipelines import caption_examples, image_ops, video_ops
from data_pipelines import features as F
from data_pipelines.checks import decode_image
from data_pipelines.text_ops import Tokenizer, pre_caption

_QUESTION_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")


def pre_question(text, max_words: int, record_id: str = "?", field: str = "question") -> str:
  """The official `pre_question`: lower case, `, . ' ! ? " ( ) * # : ; ~` -> space, '-' and '/'
  -> space, trailing spaces dropped, the first `max_words` space-separated words (runs of spaces
  count as empty words, as in the official split)."""
  if not isinstance(text, str):
    raise F.SkipRecord("bad_field_type", record_id, field, f"is {type(text).__name__}, not str")
  q = _QUESTION_PUNCT.sub(" ", text.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
  words = q.split(" ")
  if len(words) > max_words:
    q = " ".join(words[:max_words])
  if not q.strip():
    raise F.SkipRecord("empty_caption", record_id, field, f"nothing left of {text[:60]!r}")
  return q


def left_or_right(*texts) -> bool:
  """The official careful-flip test: "left" or "right" inside any text (or list of texts)."""
  flat = [t for x in texts for t in (x if isinstance(x, (list, tuple)) else [x])]
  return any(("left" in t or "right" in t) for t in flat if isinstance(t, str))


def answer_layout(tokenizer: Tokenizer, answer: str, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) int32 [length]: `[CLS] pieces [SEP]` of a raw answer (the tokenizer lower-cases
  it; no cleaning, as the official answers), pieces cut to length - 2, [PAD]-padded. The empty
  answer is `[CLS] [SEP]`."""
  ids, _ = tokenizer.pieces(answer) if answer else ([], [])
  ids = [tokenizer.cls_id] + ids[: length - 2] + [tokenizer.sep_id]
  out, mask = np.zeros(length, np.int32), np.zeros(length, np.int32)
  out[: len(ids)], mask[: len(ids)] = ids, 1
  return out, mask


def question_fields(raw, cfg: F.PreprocConfig, tokenizer: Tokenizer, rid: str, clean=pre_question):
  """Text fields of a question / sentence with the MLM fields unmasked."""
  tok = tokenizer(clean(raw, cfg.max_tokens, rid, "captions[0]"), rid, "captions[0]")
  m = cfg.max_masks
  return {
    F.TEXT_IDS: tok.ids,
    F.TEXT_MASK: tok.mask,
    F.MLM_IDS: tok.ids.copy(),
    F.MLM_POSITIONS: np.zeros(m, np.int32),
    F.MLM_LABELS: np.zeros(m, np.int32),
    F.MLM_WEIGHTS: np.zeros(m, np.float32),
  }


def top_answers(answers, weights, a: int) -> list[int]:
  """Indices of the `a` heaviest answers, ties in their order."""
  order = sorted(range(len(answers)), key=lambda i: -float(weights[i]))
  return order[:a]


def _image(data, rid, field, rng, cfg: F.PreprocConfig, allow_flip: bool) -> np.ndarray:
  img = decode_image(data, rid, field)
  if not cfg.train:
    return image_ops.eval_transform(img, cfg.image_res)
  return image_ops.image_text_transform(
    img, rng, cfg.image_res, cfg.crop_scale, cfg.randaugment, allow_flip=allow_flip
  )


def vqa_example(record, rng, cfg: F.PreprocConfig, tokenizer: Tokenizer) -> dict:
  rid, answers = record["id"], list(record.get("answers") or [])
  weights = list(record.get("answer_weights") or [])
  if not answers or len(weights) != len(answers):
    raise F.SkipRecord("bad_field_type", rid, "answer", "a training question needs its answers")
  question = record["captions"][0]
  flip = cfg.hflip and not left_or_right(question, answers)
  out = {F.PIXELS: _image(record["image"], rid, "image", rng, cfg, flip)}
  out.update(question_fields(question, cfg, tokenizer, rid))
  a, la = cfg.max_answers, cfg.answer_tokens
  out[F.ANSWER_IDS] = np.zeros((a, la), np.int32)
  out[F.ANSWER_MASK] = np.zeros((a, la), np.int32)
  out[F.ANSWER_WEIGHTS] = np.zeros(a, np.float32)
  for slot, i in enumerate(top_answers(answers, weights, a)):
    out[F.ANSWER_IDS][slot], out[F.ANSWER_MASK][slot] = answer_layout(tokenizer, answers[i], la)
    out[F.ANSWER_WEIGHTS][slot] = weights[i]
  return out


def nlvr2_example(record, rng, cfg: F.PreprocConfig, tokenizer: Tokenizer) -> dict:
  rid = record["id"]
  out = {
    F.PIXELS: _image(record["image"], rid, "images[0]", rng, cfg, cfg.hflip),
    F.PAIR_PIXELS: _image(record["pair_image"], rid, "images[1]", rng, cfg, cfg.hflip),
  }
  out.update(question_fields(record["captions"][0], cfg, tokenizer, rid, clean=pre_caption))
  out[F.LABEL] = np.int32(record["label"])
  return out


def video_qa_example(record, rng, cfg: F.PreprocConfig, tokenizer: Tokenizer) -> dict:
  rid, frames = record["id"], record["clips"][0]
  if not frames:
    raise F.SkipRecord("empty_video", rid, "frames", "0 frames")
  question = record["captions"][0]
  flip = cfg.hflip and not left_or_right(question, record.get("answer", ""))
  ids = video_ops.sample_frame_ids(len(frames), cfg.frame_len, cfg.train, rng)
  out = {
    F.FRAMES: np.stack([_image(frames[i], rid, f"frames[{i}]", rng, cfg, flip) for i in ids]),
    F.FRAME_VALID: np.ones(cfg.frame_len, np.int32),
  }
  out.update(question_fields(question, cfg, tokenizer, rid))
  out[F.LABEL] = np.int32(record["label"])
  return out


BUILDERS = {
  F.VQA: vqa_example,
  F.NLVR2: nlvr2_example,
  F.VIDEO_QA: video_qa_example,
  F.CAPTION: caption_examples.caption_example,
}


def make_example(kind: str, record: dict, rng, cfg: F.PreprocConfig, tokenizer: Tokenizer):
  """One example of the task `cfg.task_fields` from a task source's record."""
  if F.TASK_KIND.get(cfg.task_fields) != kind:
    raise ValueError(f"task_fields {cfg.task_fields!r} does not extend the {kind!r} kind")
  if not isinstance(record.get("captions"), list) or not record["captions"]:
    raise F.SkipRecord("bad_field_type", str(record.get("id", "?")), "captions", "no question")
  return BUILDERS[cfg.task_fields](record, rng, cfg, tokenizer)
