"""Captioning training examples as the official `coco_karpathy_train_mlm.preprocess_fg_free`
builds them (docs/finetuning.md#captioning; the model side is `x2vlm_jax/tasks_caption.py`).

  tokens   `[CLS]` + prompt pieces + caption pieces + `[SEP]`, cut to max_tokens L (a long
           caption loses its `[SEP]`, as in the official). The raw caption is tokenised without
           `pre_caption`: WordPiece lower-cases it and splits punctuation off (official).
  masking  n = min(max_masks, max(1, round((len - prompt) * mask_prob))) positions after the
           prompt, whole-word + span masking (`masking.choose_masked_positions`, `[SEP]`
           eligible); the 80/10/10 replacement is not used.
  layout   a `[MASK]` inserted before every chosen token, both with that token's position id;
           padded to Lc = L + max_masks ([PAD] ids, positions continuing after the last token).

Fields (besides pixels and the kind's text fields, which hold the plain tokens): caption_ids,
caption_positions, caption_inserted int32 [Lc]; mlm_positions (the [MASK] slots in caption_ids),
mlm_labels (the tokens they predict), mlm_weights [M].
"""

from __future__ import annotations

import numpy as np

from data_pipelines import features as F
from data_pipelines import image_ops
from data_pipelines.checks import decode_image
from data_pipelines.masking import choose_with
from data_pipelines.text_ops import Tokenizer


def caption_tokens(tokenizer: Tokenizer, prompt: str, caption, rid: str, max_tokens: int):
  """(ids, pieces, prompt length) of `[CLS] prompt caption [SEP]` cut to max_tokens."""
  if not isinstance(caption, str):
    raise F.SkipRecord("bad_field_type", rid, "caption", f"is {type(caption).__name__}, not str")
  ids, pieces = tokenizer.pieces(caption)
  if not ids:
    raise F.SkipRecord("caption_no_tokens", rid, "caption", f"{caption[:60]!r} has no word piece")
  p_ids, p_pieces = tokenizer.pieces(prompt) if prompt.strip() else ([], [])
  all_ids = [tokenizer.cls_id] + p_ids + ids + [tokenizer.sep_id]
  all_pieces = [tokenizer.cls_token] + p_pieces + pieces + [tokenizer.sep_token]
  return all_ids[:max_tokens], all_pieces[:max_tokens], len(p_ids)


def insert_masks(ids, masked, mask_id: int, max_tokens: int, max_masks: int) -> dict:
  """The FG-free layout (module docstring) of real token ids with the masked positions."""
  lc = max_tokens + max_masks
  out_ids, positions, inserted, slots, labels = [], [], [], [], []
  chosen = set(masked)
  for p, t in enumerate(ids):
    if p in chosen:
      slots.append(len(out_ids))
      labels.append(t)
      out_ids.append(mask_id)
      positions.append(p)
      inserted.append(1)
    out_ids.append(t)
    positions.append(p)
    inserted.append(0)
  n = len(out_ids)
  fields = {
    F.CAPTION_IDS: np.zeros(lc, np.int32),
    F.CAPTION_POSITIONS: np.arange(len(ids) - n, len(ids) - n + lc, dtype=np.int32),
    F.CAPTION_INSERTED: np.zeros(lc, np.int32),
    F.MLM_POSITIONS: np.zeros(max_masks, np.int32),
    F.MLM_LABELS: np.zeros(max_masks, np.int32),
    F.MLM_WEIGHTS: np.zeros(max_masks, np.float32),
  }
  fields[F.CAPTION_IDS][:n] = out_ids
  fields[F.CAPTION_POSITIONS][:n] = positions  # padding continues len(ids), len(ids) + 1, ...
  fields[F.CAPTION_INSERTED][:n] = inserted
  fields[F.MLM_POSITIONS][: len(slots)] = slots
  fields[F.MLM_LABELS][: len(slots)] = labels
  fields[F.MLM_WEIGHTS][: len(slots)] = 1.0
  return fields


def caption_example(record, rng, cfg: F.PreprocConfig, tokenizer: Tokenizer) -> dict:
  """One training example from a retrieval-format record (one caption of `captions` drawn)."""
  rid, captions = record["id"], record["captions"]
  caption = captions[int(rng.integers(0, len(captions)))]
  ids, pieces, n_prompt = caption_tokens(
    tokenizer, cfg.caption_prompt, caption, rid, cfg.max_tokens
  )
  n_pred_base = len(pieces) - n_prompt  # the official n counts [CLS] and [SEP], not the prompt
  masked = choose_with(
    cfg,
    pieces,
    rng,
    first=1 + n_prompt,
    n_tokens=n_pred_base,
  )
  img = decode_image(record["image"], rid, "image")
  if cfg.train:
    pixels = image_ops.image_text_transform(
      img, rng, cfg.image_res, cfg.crop_scale, cfg.randaugment, allow_flip=cfg.hflip
    )
  else:
    pixels = image_ops.eval_transform(img, cfg.image_res)
  text = np.zeros(cfg.max_tokens, np.int32)
  text[: len(ids)] = ids
  mask = (text > 0).astype(np.int32)
  out = {F.PIXELS: pixels, F.TEXT_IDS: text, F.TEXT_MASK: mask, F.MLM_IDS: text.copy()}
  out.update(insert_masks(ids, masked, tokenizer.mask_id, cfg.max_tokens, cfg.max_masks))
  return out
