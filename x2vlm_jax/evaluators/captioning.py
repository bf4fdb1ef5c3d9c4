"""The captioning evaluator (called by `run.evaluate`): the official generation on every image of
a split, COCO caption metrics against its captions, and the COCO caption result file.

Evaluation files are the official Karpathy test / val files read by the image-kind sources
(`{"image", "caption": [references]}` per image, docs/finetuning.md#captioning); the image id is
the record's `image_id` when the file has one, else the official parse of the image file name
(`caption_metric.image_id_from_path`), else the record id.

Jitted function (compiled once per batch shape; graphdef and decoding settings static):
  generate(pixels [B, R, R, 3], prompt [P]) -> tokens [B, steps], lengths [B], scores [B]
Batches are laid out over the mesh's batch shards like every evaluation input; outputs are
replicated.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import features as F
from data_pipelines import image_ops, mixture
from data_pipelines.checks import decode_image
from x2vlm_jax import caption_decode
from x2vlm_jax.evaluators import caption_metric
from x2vlm_jax.evaluators.settings import CaptionSettings, prefix


@dataclasses.dataclass
class CaptionSet:
  """Test-transformed images [N, R, R, 3], their ids and reference captions."""

  pixels: np.ndarray
  image_ids: list
  references: list[list[str]]
  skips: collections.Counter


def _image_id(src, i: int, record: dict):
  if record.get("image_id") not in (None, ""):
    v = str(record["image_id"])
    return int(v) if v.isdigit() else v
  raw = getattr(src, "raw_entry", None)
  if raw is not None:
    path = json.loads(raw(i)).get("image")
    if isinstance(path, str):
      return caption_metric.image_id_from_path(path)
  return str(record.get("id"))


def caption_set(sources, res: int, max_images: int = 0) -> CaptionSet:
  """Every image of the sources with its references (unreadable records counted by reason)."""
  skips, pixels, ids, refs = collections.Counter(), [], [], []
  for src in sources:
    for i in range(len(src)):
      if max_images and len(ids) >= max_images:
        break
      try:
        rec = src[i]
        img = image_ops.eval_transform(decode_image(rec["image"], rec["id"], "image"), res)
      except F.SkipRecord as e:
        skips[e.reason] += 1
        continue
      caps = [c for c in rec.get("captions") or [] if isinstance(c, str) and c.strip()]
      if not caps:
        skips["empty_caption"] += 1
        continue
      pixels.append(img)
      ids.append(_image_id(src, i, rec))
      refs.append(caps)
  stacked = np.stack(pixels) if pixels else np.zeros((0, res, res, 3), np.uint8)
  return CaptionSet(stacked, ids, refs, skips)


def _generate(graphdef, state, pixels, prompt, cfg):
  return caption_decode.generate(nnx.merge(graphdef, state), pixels, prompt, cfg)


@functools.lru_cache(maxsize=8)
def _jitted(out_sharding):
  return jax.jit(_generate, static_argnums=(0, 4), out_shardings=out_sharding)


def decode_settings(sec: CaptionSettings, tokenizer, batch: int, prompt_len: int):
  """The DecodeConfig of the settings (the official length quirk when asked for)."""
  steps = sec.max_length
  if sec.official_length_cap:
    steps = batch + sec.max_length - prompt_len
  return caption_decode.DecodeConfig(
    num_beams=sec.num_beams,
    max_length=steps,
    min_length=sec.min_length,
    length_penalty=sec.length_penalty,
    no_repeat_ngram=sec.no_repeat_ngram,
    eos_id=tokenizer.sep_id,
    mask_id=tokenizer.mask_id,
  )


def generate_captions(fns, pixels: np.ndarray, tokenizer, sec: CaptionSettings, batch: int):
  """(captions, token lengths) of every image (`fns`: `run._Fns`)."""
  p_ids, _ = tokenizer.pieces(sec.prompt) if sec.prompt.strip() else ([], [])
  prompt = np.asarray([tokenizer.cls_id] + p_ids, np.int32)
  cfg = decode_settings(sec, tokenizer, batch, len(prompt))
  out = None if fns.mesh is None else NamedSharding(fns.mesh, PartitionSpec())  # replicated
  gen = _jitted(out)

  def fn(state, px):
    c = gen(fns.graphdef, state, px, prompt, cfg)
    return c.tokens, c.lengths

  tokens, lengths = fns.batched(fn, batch, pixels)
  return [tokenizer.decode(t[:n]) for t, n in zip(tokens, lengths)], lengths


def run_caption(fns, sec: CaptionSettings, tokenizer, res, batch, result_dir, say) -> dict:
  """Every split of the captioning evaluator: metrics and the result JSON."""
  metrics, out_dir = {}, sec.result_dir or result_dir
  for split, entries in sec.data:
    t0, name = time.time(), prefix("caption", split)
    data = caption_set(
      [mixture.build_source(F.IMAGE, dict(e)) for e in entries], res, sec.max_images
    )
    if data.skips:
      say(f"{name}: skipped {dict(data.skips)}")
    captions, lengths = generate_captions(fns, data.pixels, tokenizer, sec, batch)
    results = dict(zip(data.image_ids, captions))
    refs = dict(zip(data.image_ids, data.references))
    if out_dir and jax.process_index() == 0:
      os.makedirs(out_dir, exist_ok=True)
      path = os.path.join(out_dir, f"caption_result{'_' + split if split else ''}.json")
      caption_metric.write_results(path, results)
      say(f"{name}: wrote {path}")
    for k, v in caption_metric.score_captions(results, refs).items():
      metrics[f"{name}/{k}"] = v
    metrics[f"{name}/mean_tokens"] = float(np.mean(lengths))
    metrics[f"{name}/num_images"] = float(len(results))
    metrics[f"{name}/seconds"] = time.time() - t0
  return metrics
