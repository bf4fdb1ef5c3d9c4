"""Runs the configured evaluators on a model: the glue between model, data and metric functions.

`evaluate(model, eval_cfg, tokenizer, mesh)` is what `train.py` calls every `eval_every` steps
and `eval.py` once on a checkpoint. It builds the evaluation sets from source entries (the same
`{'type': 'jsonl' | 'arrayrecord' | 'synthetic', ...}` entries as training data,
`eval_data.py`), computes features with a few jitted functions of fixed shapes, and hands arrays
and an ITM scorer to the pure metric functions (`retrieval.py`, `grounding.py`).

Jitted functions (each compiled once per evaluation shape, reused by every later call):
  encode_images(pixels [B, R, R, 3])  -> vision tokens [B, S, Dv], ITC features [B, E]
  encode_texts(ids, mask [B, L])      -> text states [B, L, Dt], ITC features [B, E]
  itm(vision [Ni, S, Dv], text [Nt, L, Dt], mask [Nt, L], img [C], txt [C]) -> ITM logit of
      class 1 [C] of the C pairs (img[c], txt[c]); itm_kv: the same from vision_kv(vision)
  boxes(vision [B, S, Dv], text [B, L, Dt], mask [B, L]) -> (cx, cy, w, h) [B, 4]
Vision tokens and text states are computed once per image / text. For retrieval they are then
placed on the devices once (replicated: COCO at base is 1.5 GB of bf16 tokens) and the ITM
scorer sends only the pair indices of a chunk, gathers the rows on the device and runs only the
fusion tower (docs/fidelity.md#retrieval-protocol): no host gather and no host-to-device copy of
[C, S, Dv] tokens per chunk. The cross-attention keys/values of every image are computed once
(`vision_kv`) and picked per pair (`itm_kv`) where they fit in `kv_budget()`; else each chunk
projects them from the gathered tokens (`itm`).

With a mesh, every input batch is laid out with its batch axis over the mesh's batch shards
(the batch is rounded up to a multiple of their number) and outputs are replicated, so every
process reads the full result; every process builds the same evaluation set (evaluation sets
are small).

What runs is an `EvalConfig` (`run_config.eval_config` builds it from the config's `eval`
section: `evaluators` names the ones to run, one sub-section of settings each).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import features as F
from data_pipelines import mixture
from x2vlm_jax import global_batch, sharding
from x2vlm_jax.evaluators import captioning, eval_data, grounding, qa, retrieval
from x2vlm_jax.evaluators.settings import EvalConfig, GroundingSettings, RetrievalSettings, prefix


def _sources(kind: str, entries) -> list:
  return [mixture.build_source(kind, dict(e)) for e in entries]


def _model(graphdef, state):
  return nnx.merge(graphdef, state)


def _encode_images(graphdef, state, pixels):
  m = _model(graphdef, state)
  tokens = m.encode_image(pixels)  # [B, S, Dv]
  return tokens, m.vision_proj(tokens[:, 0])  # [B, S, Dv], [B, E]


def _encode_videos(graphdef, state, frames):
  m = _model(graphdef, state)
  tokens = m.encode_video(frames)  # [B, S, Dv]: frames averaged (with the frame embedding)
  return tokens, m.vision_proj(tokens[:, 0])  # [B, S, Dv], [B, E]


def _encode_texts(graphdef, state, ids, mask):
  m = _model(graphdef, state)
  states = m.encode_text(ids, mask)  # [B, L, Dt]
  return states, m.text_proj(states[:, 0])  # [B, L, Dt], [B, E]


def _fused(graphdef, state, vision, text, mask):
  m = _model(graphdef, state)
  vmask = jnp.ones(vision.shape[:2], jnp.int32)  # full image: every vision token visible
  return m, m.fuse(text, mask, vision, vmask)  # [C, L, Dt]


def _itm(graphdef, state, vision, text, mask, img, txt):
  m, fused = _fused(graphdef, state, vision[img], text[txt], mask[txt])
  # The official ranking score is the raw class-1 logit, not a probability
  # (docs/fidelity.md#retrieval-protocol).
  return m.itm_logits(fused)[:, 1].astype(jnp.float32)  # [C]


def _vision_kv(graphdef, state, vision):
  return _model(graphdef, state).vision_kv(vision)  # VisionKV, [layers, N, S, H, dh] each


def _itm_kv(graphdef, state, kv, text, mask, img, txt):
  """`_itm` from every image's precomputed cross-attention K/V (`kv_index` = img): the same
  numbers without projecting an image's K/V again for each of its pairs."""
  m = _model(graphdef, state)
  vmask = jnp.ones((img.shape[0], kv.key.shape[2]), jnp.int32)  # full image
  fused = m.fuse(text[txt], mask[txt], kv, vmask, kv_index=img)
  return m.itm_logits(fused)[:, 1].astype(jnp.float32)  # [C]


def _boxes(graphdef, state, vision, text, mask):
  m, fused = _fused(graphdef, state, vision, text, mask)
  return m.box(fused).astype(jnp.float32)  # [B, 4]


@functools.lru_cache(maxsize=8)
def _jitted(mesh: Mesh | None) -> dict[str, Callable]:
  """The jitted functions for one mesh; the graphdef is a static argument, so periodic
  evaluation during training re-uses the compiled code of the previous call."""
  out = None if mesh is None else NamedSharding(mesh, PartitionSpec())  # replicated outputs
  jit = functools.partial(jax.jit, static_argnums=0, out_shardings=out)
  return {
    "encode_images": jit(_encode_images),
    "encode_videos": jit(_encode_videos),
    "encode_texts": jit(_encode_texts),
    "itm": jit(_itm),
    "vision_kv": jit(_vision_kv),
    "itm_kv": jit(_itm_kv),
    "boxes": jit(_boxes),
  }


class _Fns:
  """The model's evaluation functions on one mesh, bound to its current parameters."""

  def __init__(self, model, mesh: Mesh | None):
    self.graphdef, self.state = nnx.split(model)
    self.model_cfg = model.cfg
    self.mesh = mesh
    self.shards = sharding.batch_shards(mesh)
    jitted = _jitted(mesh)
    for name, fn in jitted.items():
      setattr(self, name, functools.partial(fn, self.graphdef))

  @property
  def kv_row_bytes(self) -> int:
    """Bytes of one vision token's K (or V) over every fusion layer, in the compute dtype."""
    cfg = self.model_cfg
    return cfg.fusion.depth * cfg.text.width * jnp.dtype(cfg.dtype).itemsize

  def put(self, x: np.ndarray):
    """Host batch (the same on every process) -> device array, batch axis over the mesh."""
    return x if self.mesh is None else global_batch.put_global(x, self.mesh)

  def put_replicated(self, x: np.ndarray) -> jax.Array:
    """Host array (the same on every process) -> a device array whole on every device."""
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.make_array_from_callback(
      x.shape, NamedSharding(self.mesh, PartitionSpec()), lambda idx: x[idx]
    )

  def round_batch(self, n: int) -> int:
    return max(self.shards, -(-n // self.shards) * self.shards)

  def batched(self, fn: Callable, batch: int, *arrays: np.ndarray) -> list[np.ndarray]:
    """Applies fn over leading-axis batches of fixed size (last batch padded by repetition)."""
    n = arrays[0].shape[0]
    outs = None
    for start in range(0, n, batch):
      stop = min(start + batch, n)
      take = np.minimum(np.arange(start, start + batch), stop - 1)  # pad with the last row
      res = fn(self.state, *(self.put(a[take]) for a in arrays))
      res = res if isinstance(res, tuple) else (res,)
      host = [np.asarray(jax.device_get(r))[: stop - start] for r in res]
      outs = [[h] for h in host] if outs is None else [o + [h] for o, h in zip(outs, host)]
    return [np.concatenate(o) for o in outs]


def kv_budget() -> int:
  """Bytes the precomputed K/V of an evaluation set may take per device: a quarter of the
  smallest device memory where the backend reports it (GPU; COCO 5K images at base in bf16
  is 18 GB), else 4 GB."""
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  limits = [s["bytes_limit"] for s in stats if "bytes_limit" in s]
  return min(limits) // 4 if limits else 4 << 30


def run_retrieval(
  fns: _Fns,
  data: eval_data.RetrievalSet,
  batch: int,
  k_test: int,
  itm_chunk: int,
  prefix: str = "eval/retrieval",
  kv_bytes_limit: int | None = None,
) -> dict[str, float]:
  """ITC features for all images (or videos) and texts, then the official ITM re-ranking
  (docs/fidelity.md#retrieval-protocol). Every image's cross-attention K/V are computed once and
  kept on the devices when they take at most `kv_bytes_limit` bytes (None: `kv_budget`), else
  each ITM chunk projects them from the gathered vision tokens; same scores either way."""
  encode = fns.encode_videos if data.pixels.ndim == 5 else fns.encode_images
  vis_tokens, img_feat = fns.batched(encode, batch, data.pixels)
  txt_states, txt_feat = fns.batched(fns.encode_texts, batch, data.ids, data.mask)

  vision = fns.put_replicated(vis_tokens)
  on_device = [fns.put_replicated(x) for x in (txt_states, data.mask)]
  kv_bytes = 2 * vis_tokens.shape[0] * vis_tokens.shape[1] * fns.kv_row_bytes
  if kv_bytes <= (kv_budget() if kv_bytes_limit is None else kv_bytes_limit):
    itm, first = fns.itm_kv, fns.vision_kv(fns.state, vision)
  else:
    itm, first = fns.itm, vision

  def itm_score_fn(img_idx: np.ndarray, txt_idx: np.ndarray) -> np.ndarray:
    scores = itm(fns.state, first, *on_device, fns.put(img_idx), fns.put(txt_idx))
    return np.asarray(jax.device_get(scores))

  out = retrieval.evaluate_retrieval(
    img_feat,
    txt_feat,
    data.txt2img,
    data.img2txt,
    itm_score_fn,
    k_test=k_test,
    chunk_size=itm_chunk,
    prefix=prefix,
  )
  out.update(
    retrieval.evaluate_retrieval_itc(
      img_feat, txt_feat, data.txt2img, data.img2txt, prefix=prefix + "_itc"
    )
  )
  out[f"{prefix}/num_images"] = float(len(data.img2txt))
  out[f"{prefix}/num_texts"] = float(len(data.captions))
  out[f"{prefix}/chance_r1"] = 100.0 / len(data.img2txt)  # text -> image R@1 of a random ranker
  return out


def predict_boxes(fns: _Fns, data: eval_data.GroundingSet, batch: int) -> np.ndarray:
  """[Np, 4] normalised (cx, cy, w, h) for every phrase, from the full image
  (docs/fidelity.md#grounding-protocol)."""
  vis_tokens, _ = fns.batched(fns.encode_images, batch, data.pixels)
  txt_states, _ = fns.batched(fns.encode_texts, batch, data.ids, data.mask)
  vision = vis_tokens[data.image_index]  # [Np, S, Dv]
  (boxes,) = fns.batched(fns.boxes, batch, vision, txt_states, data.mask)
  return boxes


def _retrieval(fns, sec: RetrievalSettings, tokenizer, res, frame_len, batch, say) -> dict:
  metrics = {}
  for split, entries in sec.data:
    t0, name = time.time(), prefix("retrieval", split)
    data = eval_data.retrieval_set(
      _sources(sec.kind, entries),
      tokenizer,
      res,
      sec.max_images,
      frame_len=frame_len if sec.kind == F.VIDEO else 0,
    )
    if data.skips:
      say(f"{name}: skipped {data.skips}")
    k, chunk = sec.k_test, fns.round_batch(sec.itm_chunk)
    metrics.update(run_retrieval(fns, data, batch, k, chunk, prefix=name))
    metrics[f"{name}/seconds"] = time.time() - t0
  if sec.mean_name:
    names = [prefix("retrieval", split) for split, _ in sec.data]
    metrics.update(retrieval.mean_over_splits(metrics, names, prefix("retrieval", sec.mean_name)))
  return metrics


def _grounding(fns, sec: GroundingSettings, tokenizer, res, batch, png_path, say) -> dict:
  metrics = {}
  for split, entries in sec.data:
    t0, name = time.time(), prefix("grounding", split)
    data = eval_data.grounding_set(_sources(F.REGION, entries), tokenizer, res, sec.max_phrases)
    if data.skips:
      say(f"{name}: skipped {data.skips}")
    boxes = predict_boxes(fns, data, batch)
    metrics.update(grounding.evaluate_grounding(boxes, data.image_wh, data.gt_boxes, prefix=name))
    metrics[f"{name}/seconds"] = time.time() - t0
    if png_path and sec.png_examples > 0 and jax.process_index() == 0:
      from x2vlm_jax.evaluators import visualize  # pylint: disable=g-import-not-at-top

      path = png_path if not split else png_path.replace(".png", f"_{split}.png")
      visualize.write_grounding_png(path, data, boxes, sec.png_examples)
      say(f"{name}: wrote {path}")
  return metrics


def evaluate(
  model,
  eval_cfg: EvalConfig,
  tokenizer,
  mesh: Mesh | None = None,
  *,
  step: int | None = None,
  png_path: str | None = None,
  log: Callable[[str], None] | None = print,
  result_dir: str | None = None,
) -> dict[str, float]:
  """Runs the configured evaluators on every split; returns {metric name: value}
  (names in `settings.py`: 'eval/<evaluator>[/<split>]/<metric>').

  Args:
    model: an `X2VLM` (parameters possibly sharded over `mesh`).
    eval_cfg: which evaluators run, with their settings (`run_config.eval_config`).
    tokenizer: a `text_ops.Tokenizer`; its max_tokens is the text length L.
    mesh: shard evaluation batches over this mesh's batch axes; None = no sharding.
    step: training step, only used in log lines.
    png_path: if given (and grounding runs), write predicted vs true boxes of a few images there.
    log: where to report progress and skip counts (None = silent).
    result_dir: where result files go (the VQA and caption result JSON) unless the settings
      name one.
  """
  where = "" if step is None else f" (step {step})"
  say = (lambda s: log(s + where)) if log else (lambda _: None)
  mvptr = eval_cfg.mvptr_inputs is not None or any(n.startswith("mvptr_") for n in eval_cfg.names)
  if mvptr:  # an MVPTR run: its own evaluators (mvptr_run.py; errors name what is missing)
    from x2vlm_jax.evaluators import mvptr_run  # pylint: disable=g-import-not-at-top

    return mvptr_run.evaluate(model, eval_cfg, say, result_dir)
  fns = _Fns(model, mesh)
  batch = fns.round_batch(eval_cfg.batch_size)
  res, frame_len = model.cfg.vision.image_size, max(model.cfg.frame_len, 1)
  metrics: dict[str, float] = {}
  if eval_cfg.retrieval is not None:
    metrics.update(_retrieval(fns, eval_cfg.retrieval, tokenizer, res, frame_len, batch, say))
  if eval_cfg.grounding is not None:
    metrics.update(_grounding(fns, eval_cfg.grounding, tokenizer, res, batch, png_path, say))
  if eval_cfg.vqa is not None:
    metrics.update(qa.run_vqa(fns, eval_cfg.vqa, tokenizer, res, batch, result_dir, say))
  if eval_cfg.caption is not None:
    sec = eval_cfg.caption
    metrics.update(captioning.run_caption(fns, sec, tokenizer, res, batch, result_dir, say))
  for task in ("nlvr2", "video_qa"):
    if getattr(eval_cfg, task) is not None:
      sec = getattr(eval_cfg, task)
      metrics.update(qa.run_classify(fns, task, sec, tokenizer, res, frame_len, batch, say))
  return metrics


def format_metrics(metrics: Mapping[str, Any]) -> str:
  """The headline numbers on one line, per evaluator and split: R@1/5/10 both directions and
  chance for retrieval, accuracy and its baselines for grounding."""
  parts = []
  r = lambda key: "/".join(f"{metrics[f'{key}{k}']:.1f}" for k in (1, 5, 10))
  for key in sorted(k for k in metrics if k.endswith("/img_r1")):
    pre = key[: -len("/img_r1")]
    name = pre[len("eval/") :]
    parts.append(
      f"{name}: text->image R@1/5/10 {r(pre + '/img_r')}, image->text {r(pre + '/txt_r')}"
      + (
        f" (chance R@1 {metrics[pre + '/chance_r1']:.1f})" if pre + "/chance_r1" in metrics else ""
      )
    )
  for key in sorted(k for k in metrics if k.startswith("eval/grounding") and k.endswith("/acc")):
    pre = key[: -len("/acc")]
    parts.append(
      f"{pre[len('eval/') :]} acc {metrics[key]:.1f} (baselines: whole image "
      f"{metrics[pre + '/acc_whole_image']:.1f}, mean box {metrics[pre + '/acc_mean_box']:.1f})"
    )
  for key in sorted(k for k in metrics if k.split("/")[1] in ("vqa", "nlvr2", "video_qa")):
    if key.endswith("/acc"):
      pre = key[: -len("/acc")]
      parts.append(
        f"{pre[len('eval/') :]} acc {metrics[key]:.1f} (majority "
        f"{metrics.get(pre + '/acc_majority', float('nan')):.1f})"
      )
  for key in sorted(k for k in metrics if k.startswith("eval/caption") and k.endswith("/cider")):
    pre = key[: -len("/cider")]
    parts.append(
      f"{pre[len('eval/') :]} BLEU-4 {metrics[pre + '/bleu_4']:.1f} CIDEr {metrics[key]:.1f}"
    )
  return "; ".join(parts)
