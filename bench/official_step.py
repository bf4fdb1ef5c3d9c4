"""Speed of the OFFICIAL PyTorch X^2-VLM pre-training step on this host; prints one JSON object.

The counterpart of bench/train_step.py for issue 19's side-by-side comparison: it imports the
pre-training model `XVLM` of a checkout of zengyan-97/X2-VLM (`models/model_pretrain.py`; never
vendored here), builds it with random init, and times the official loop's mixed step
(`Pretrain.py`, `run_mixed_iter`) on one fixed random batch of the shapes bench/train_step.py
uses. Get a checkout outside this repository, e.g. from the read-only mirror:

  mkdir -p /tmp/x2vlm_official && git -C /work/.mirror/zengyan-97+X2-VLM/repo archive HEAD \
      -- . ':(exclude)*.jar' | tar -x -C /tmp/x2vlm_official

The three cases of issue 19 (fp32 CPU, 2 threads; the defaults give the issue's shapes):

  python bench/official_step.py --official_repo /tmp/x2vlm_official              # (a) base mixed
  python bench/official_step.py --official_repo /tmp/x2vlm_official --region_batch 0  # (b)
  python bench/official_step.py --official_repo /tmp/x2vlm_official \
      --dims width=64,heads=4,mlp=256,layers=2+2+2,vocab=1024,embed=32          # (c) tiny

Flags: --image_batch 8 --region_batch 8 --region_max_images 4 --image_res (224; 96 with --dims)
--max_tokens (30; 16 with --dims) --max_masks (12; 6 with --dims) --threads 2 --steps 3
--warmup 1 --no_itm --seed 0 --out rows.jsonl. `--dims` takes bench/dims.py's keys (width,
heads, mlp, layers=vision+text+fusion, vocab, embed, patch, vision_*/text_* per tower); the
official code has one BERT config for text and fusion, so fusion_heads / fusion_mlp cannot
differ from the text's.

The model: configs/pretrain/x2vlm_base_4m.yaml of the checkout (read with PyYAML) with
`image_res` from the flags, a BERT `config.json` with bert-base-uncased's standard values
written to a temporary directory (no weights, no vocabulary: nothing is downloaded;
`load_vision_params` / `load_text_params` False), and configs/config_beit2_base.json for the
vision tower. With `--dims`, the sizes are changed in those configs (`text_num_hidden_layers`,
`text_fusion_start_at`, `vision_num_hidden_layers`, `embed_dim`) and the BEiT-v2 base factory
is replaced by the same `VisionTransformer` at the given width / heads / MLP.

The step, as `run_mixed_iter` with an image batch and a region batch: clamp `temp` to
[0.001, 0.5]; forward the image batch (ITC + ITM + MLM) and the region batch (ITC + ITM + MLM +
box L1 + GIoU, `ret_bbox_loss=True`, `is_image` given as `calc_image_bbox_loss: False` does);
backward of the sum; `clip_grad_norm_(1.0)`; the official `optim.create_optimizer` AdamW
(betas 0.9 / 0.98, eps 1e-8, wd 0.01, lr 1e-4, x2 for new parameters). Train mode (dropout 0.1,
BEiT drop-path 0.1), as in pre-training. Differences from a real official run, all for running on
one CPU: fp32 (apex O1 is CUDA-only: FP16_OPT_LEVEL is set to O0, so xbert's fp16 branch is
off), one process (a world-size-1 gloo group, so the ITC all-gather is a copy), no scheduler step
and no data loader (the batch is built once, outside the timing).

Reports the median / min / max of `--steps` timed steps after `--warmup` untimed ones (wall time,
`torch.set_num_threads(--threads)`), examples/s per kind, parameters, the build time, the peak
RSS of the process (`resource.getrusage`, includes building the model), the load average before
and after, and every loss of the last step (at random init expect ITC ~ ln(batch), ITM ~ 0.64,
MLM ~ ln(vocab)). The import shims the official code needs under torch 2.13 / transformers 5
are in bench/official_shims.py, each documented there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# bert-base-uncased's config.json values (the official code reads them from data/bert-base-uncased).
BERT_BASE = dict(
  architectures=["BertForMaskedLM"],
  model_type="bert",
  vocab_size=30522,
  hidden_size=768,
  num_hidden_layers=12,
  num_attention_heads=12,
  intermediate_size=3072,
  hidden_act="gelu",
  hidden_dropout_prob=0.1,
  attention_probs_dropout_prob=0.1,
  max_position_embeddings=512,
  type_vocab_size=2,
  initializer_range=0.02,
  layer_norm_eps=1e-12,
  pad_token_id=0,
)


def _args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--official_repo", required=True, help="a checkout of zengyan-97/X2-VLM")
  p.add_argument("--dims", default="", help="model sizes overriding base (bench/dims.py keys)")
  p.add_argument("--image_batch", type=int, default=8)
  p.add_argument("--region_batch", type=int, default=8)
  p.add_argument("--region_max_images", type=int, default=4)
  p.add_argument("--image_res", type=int, default=None, help="default 224 (96 with --dims)")
  p.add_argument("--max_tokens", type=int, default=None, help="default 30 (16 with --dims)")
  p.add_argument("--max_masks", type=int, default=None, help="default 12 (6 with --dims)")
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--no_itm", action="store_true", help="ret_match_loss=False")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tag", default="")
  p.add_argument("--out", default="", help="also append the JSON row to this file")
  args = p.parse_args()
  tiny = bool(args.dims)
  for name, base, small in (("image_res", 224, 96), ("max_tokens", 30, 16), ("max_masks", 12, 6)):
    if getattr(args, name) is None:
      setattr(args, name, small if tiny else base)
  if args.image_batch < 2 or args.region_batch == 1:
    raise SystemExit("ITC / ITM need at least 2 texts per batch (--image_batch, --region_batch)")
  return args


def _require_torch():
  try:
    import torch
  except ImportError:
    raise SystemExit(
      "bench/official_step.py needs PyTorch (the official code is PyTorch): "
      "pip install torch==2.13.0 transformers einops pyyaml (CPU wheels are enough)"
    ) from None
  return torch


def _sizes(dims: str) -> dict:
  """Tower sizes of the official model from a bench/dims.py string (base where not given)."""
  sys.path.insert(0, HERE)
  import dims as dims_lib

  d = dims_lib.parse(dims)
  pick = lambda tower, key, default: int(d.pop(f"{tower}_{key}", d.get(key, default)))
  out = {
    "vision_width": pick("vision", "width", 768),
    "vision_heads": pick("vision", "heads", 12),
    "vision_mlp": pick("vision", "mlp", 3072),
    "text_width": pick("text", "width", 768),
    "text_heads": pick("text", "heads", 12),
    "text_mlp": pick("text", "mlp", 3072),
  }
  for key in ("heads", "mlp"):
    fusion = d.pop(f"fusion_{key}", None)
    if fusion is not None and int(fusion) != out[f"text_{key}"]:
      raise SystemExit(f"--dims fusion_{key}: the official fusion layers share the text config")
  for key in ("width", "heads", "mlp"):
    d.pop(key, None)
  depths = [int(x) for x in d.pop("layers", "12+12+6").split("+")]
  depths = depths * 3 if len(depths) == 1 else depths
  if len(depths) != 3:
    raise SystemExit(f"--dims {dims!r}: layers= takes one depth or vision+text+fusion")
  out["vision_depth"], out["text_depth"], out["fusion_depth"] = depths
  out["vocab"] = int(d.pop("vocab", 30522))
  out["embed"] = int(d.pop("embed", 256))
  out["patch"] = int(d.pop("patch", 16))
  if d:
    raise SystemExit(f"--dims: keys the official model cannot take: {sorted(d)}")
  return out


def _yaml12(value):
  """PyYAML reads YAML 1.1, where `1e-4` is a string; the official loader (ruamel, YAML 1.2)
  reads a float. Converts such strings in the loaded config."""
  if isinstance(value, dict):
    return {k: _yaml12(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_yaml12(v) for v in value]
  if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
    return float(value)
  return value


def _official_config(args, sizes: dict, tmp: str) -> dict:
  """The official pre-training config dict, pointing at BERT / BEiT configs written into tmp."""
  import yaml

  with open(os.path.join(args.official_repo, "configs/pretrain/x2vlm_base_4m.yaml")) as f:
    config = _yaml12(yaml.safe_load(f))
  bert = dict(
    BERT_BASE,
    vocab_size=sizes["vocab"],
    hidden_size=sizes["text_width"],
    num_attention_heads=sizes["text_heads"],
    intermediate_size=sizes["text_mlp"],
  )
  text_dir = os.path.join(tmp, "bert-base-uncased")
  os.makedirs(text_dir)
  with open(os.path.join(text_dir, "config.json"), "w") as f:
    json.dump(bert, f)
  with open(os.path.join(args.official_repo, config["vision_config"])) as f:
    vision = json.load(f)
  vision.update(vision_width=sizes["vision_width"], patch_size=sizes["patch"])
  vision_path = os.path.join(tmp, "config_beit2_base.json")  # 'base' selects the base factory
  with open(vision_path, "w") as f:
    json.dump(vision, f)
  config.update(
    text_encoder=text_dir,
    vision_config=vision_path,
    image_res=args.image_res,
    patch_size=sizes["patch"],
    embed_dim=sizes["embed"],
    text_num_hidden_layers=sizes["text_depth"] + sizes["fusion_depth"],
    text_fusion_start_at=sizes["text_depth"],
    vision_num_hidden_layers=sizes["vision_depth"],
  )
  config["accelerator"]["FP16_OPT_LEVEL"] = "O0"  # fp32: apex AMP is CUDA-only
  return config


def _vision_factory(sizes: dict):
  """Replaces `models.beit2.beit_base_patch16` when the vision sizes are not base's."""
  if (sizes["vision_width"], sizes["vision_heads"], sizes["vision_mlp"]) == (768, 12, 3072):
    return
  from functools import partial

  import models.beit2 as beit2
  from torch import nn

  if sizes["vision_mlp"] % sizes["vision_width"]:
    raise SystemExit("--dims: the BEiT MLP width must be a multiple of the vision width")

  def factory(img_size, **kwargs):
    return beit2.VisionTransformer(
      img_size=img_size,
      patch_size=sizes["patch"],
      embed_dim=sizes["vision_width"],
      num_heads=sizes["vision_heads"],
      mlp_ratio=sizes["vision_mlp"] // sizes["vision_width"],
      norm_layer=partial(nn.LayerNorm, eps=1e-6),
      **kwargs,
    )

  beit2.beit_base_patch16 = factory


def _build(args, config: dict, sizes: dict):
  """(model, optimizer) as the official code builds them, random init, printing to stderr."""
  import official_shims
  import optim as official_optim
  import torch
  from models.model_pretrain import XVLM

  official_shims.patch_xbert()
  _vision_factory(sizes)
  torch.manual_seed(args.seed)
  with contextlib.redirect_stdout(sys.stderr):
    model = XVLM(config, load_vision_params=False, load_text_params=False, pretraining=True)
    model.train()
    opt_args = argparse.Namespace(**config["optimizer"])
    optimizer = official_optim.create_optimizer(opt_args, model)
  return model, optimizer


def _text(torch, fields: dict) -> dict:
  from data_pipelines import features as F

  labels = fields[F.MLM_LABELS].astype("int64")
  labels[fields[F.MLM_WEIGHTS] == 0] = -100  # the official pad label of unused mask slots
  t = lambda key: torch.as_tensor(fields[key].astype("int64"))
  return dict(
    text_ids=t(F.TEXT_IDS),
    text_atts=t(F.TEXT_MASK),
    text_ids_masked=t(F.MLM_IDS),
    masked_pos=t(F.MLM_POSITIONS),
    masked_ids=torch.as_tensor(labels),
  )


def _batches(args, sizes: dict):
  """The official model's keyword arguments for the image and the region batch (None if 0),
  from the random MixedBatch that bench/train_step.py times (same shapes and content)."""
  import torch

  sys.path.insert(0, os.path.dirname(HERE))
  from data_pipelines import features as F
  from data_pipelines.testing.random_batch import random_batch

  bs = F.BatchSizes(
    image_res=args.image_res,
    patch_size=sizes["patch"],
    max_tokens=args.max_tokens,
    max_masks=args.max_masks,
    image_batch=args.image_batch,
    region_batch=args.region_batch,
    region_max_images=args.region_max_images if args.region_batch else 0,
  )
  batch = random_batch(bs, vocab=sizes["vocab"], seed=args.seed)
  mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
  std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
  pixels = lambda x: (torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
  image = region = None
  if args.image_batch:
    b = batch[F.IMAGE]
    image = dict(image=pixels(b[F.PIXELS]), **_text(torch, b))
  if args.region_batch:
    b = batch[F.REGION]
    atts = torch.as_tensor(b[F.PATCH_MASK].astype("int64"))
    region = dict(
      image=pixels(b[F.PIXELS]),
      **_text(torch, b),
      image_atts=torch.cat([torch.ones_like(atts[:, :1]), atts], dim=1),
      idx_to_group_img=torch.as_tensor(b[F.IMAGE_INDEX].astype("int64")),
      target_bbox=torch.as_tensor(b[F.BOX]),
      is_image=torch.as_tensor(b[F.IS_IMAGE].astype("int64")),
      ret_bbox_loss=True,
    )
  return image, region


def _step(model, optimizer, image, region, itm: bool) -> dict:
  """One official mixed step (run_mixed_iter: image + region batch); returns the losses."""
  import torch

  with torch.no_grad():
    model.temp.clamp_(0.001, 0.5)
  optimizer.zero_grad()
  losses, total = {}, 0.0
  for kind, kwargs in (("image", image), ("region", region)):
    if kwargs is None:
      continue
    out = model(**kwargs, ret_match_loss=itm)
    total = total + sum(out.values())
    losses.update({f"{kind}/{k}": v for k, v in out.items()})
  total.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  optimizer.step()
  return {"total": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


def _decoder_tied(model) -> bool:
  """Whether the MLM decoder shares the word embeddings (as the official checkpoints do)."""
  mlm = model.text_encoder
  return mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight


def _official_commit(repo: str) -> str | None:
  try:
    out = subprocess.run(
      ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    )
  except (OSError, subprocess.CalledProcessError):
    return None
  return out.stdout.strip() or None


def _run(args, torch, tmp: str) -> dict:
  import torch.distributed as dist

  sizes = _sizes(args.dims)
  torch.set_num_threads(args.threads)
  # get_contrastive_loss all-gathers over the default process group: one process, world size 1.
  dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  model, optimizer = _build(args, _official_config(args, sizes, tmp), sizes)
  build_s = time.perf_counter() - t0
  image, region = _batches(args, sizes)
  itm = not args.no_itm
  times, losses = [], {}
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    losses = _step(model, optimizer, image, region, itm)
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  dist.destroy_process_group()
  step_s = statistics.median(times)
  examples = {"image": args.image_batch, "region_texts": args.region_batch}
  if args.region_batch:
    examples["region_images"] = args.region_max_images
  examples = {k: v for k, v in examples.items() if v}
  import transformers

  return {
    "impl": "official-pytorch",
    "official_commit": _official_commit(args.official_repo),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "threads": args.threads,
    "dims": args.dims or None,
    "tag": args.tag or None,
    "sizes": sizes,
    "params": sum(p.numel() for p in model.parameters()),  # shared tensors counted once
    "mlm_decoder_tied": _decoder_tied(model),
    "itm": itm,
    "image_res": args.image_res,
    "max_tokens": args.max_tokens,
    "max_masks": args.max_masks,
    "batch": examples,
    "build_s": round(build_s, 2),
    "steps_timed": args.steps,
    "warmup": args.warmup,
    "step_s": round(step_s, 4),
    "step_s_min": round(min(times), 4),
    "step_s_max": round(max(times), 4),
    "step_s_all": [round(t, 4) for t in times],
    "examples_per_s": {k: round(v / step_s, 3) for k, v in examples.items()},
    "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    "load_avg_before": [round(x, 2) for x in load_before],
    "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    "loss": losses,
    "loss_finite": all(v == v and abs(v) != float("inf") for v in losses.values()),
  }


def main():
  args = _args()
  if args.steps < 1:
    raise SystemExit("--steps must be >= 1")
  torch = _require_torch()
  if not os.path.isdir(args.official_repo):
    raise SystemExit(
      f"--official_repo {args.official_repo!r} does not exist: check out zengyan-97/X2-VLM there "
      "(see this file's docstring)"
    )
  sys.path.insert(0, HERE)
  import official_shims

  official_shims.install(args.official_repo)
  with tempfile.TemporaryDirectory(prefix="official_step_") as tmp:
    out = _run(args, torch, tmp)
  print(json.dumps(out, indent=1))
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
  main()
