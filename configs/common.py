"""The shared base of every training config: `base_config()` and small helpers.

Each config file is a `get_config(arg=None)` returning an `ml_collections.ConfigDict`; the files
for the released settings (docs/fidelity.md#released-configurations) only override what differs
from this base. The trainer locks the config (`config_flags.DEFINE_config_file(...,
lock_config=True)`), so a misspelt `--config.optim.lrr=...` is rejected instead of silently
ignored.

Sections:
  task   'pretrain' or a fine-tuning task (x2vlm_jax/tasks.py)
  model  architecture variant and overrides (image_res, frame_len, dtype, remat)
  init   where the initial weights come from (empty string = not used)
  data   tokenizer, preprocessing, per-kind source lists, aux sources, workers
  batch  GLOBAL batch sizes per kind (all processes together; see docs/training.md)
  loss   per-kind loss weights, ITM switches, the aux-stream probabilities
  optim  OptimConfig fields (x2vlm_jax/optim.py)
  mesh   device mesh (data, fsdp, tensor); one axis may be -1 = all remaining devices
  train  steps, seed, logging, checkpointing, fault handling, debugging switches
  eval   evaluators run every `train.eval_every` steps (empty = none)

Derived values are `FieldReference`s, so a command-line override of `train.total_steps` also
moves `optim.total_steps` (the schedule length), unless the schedule length is set itself.
"""

from __future__ import annotations

import dataclasses

import ml_collections as mlc
from ml_collections import config_dict

# Registers the command-line parser of source lists (`--config.data.image=jsonl:/d@0.5,...`).
from configs import source_spec  # noqa: F401  # pylint: disable=unused-import
from x2vlm_jax.evaluators.settings import EVALUATORS

KINDS = ("image", "region", "video")


def source(path: str, type: str = "jsonl", weight: float = 1.0, **kw) -> dict:  # pylint: disable=redefined-builtin
  """One data-source entry: {'type': 'jsonl' | 'arrayrecord' | 'synthetic', 'path', 'weight', ...}.

  Extra keys are passed to `data_pipelines.mixture.build_source` (e.g. image_root, split, size).
  """
  entry = {"type": type, "weight": float(weight), **kw}
  if type != "synthetic":
    entry["path"] = path
  return entry


def synthetic(size: int, seed: int = 0, weight: float = 1.0, **world) -> dict:
  """An in-memory shapes-world source of `size` records (data_pipelines/synthetic.py)."""
  entry = {"type": "synthetic", "size": int(size), "seed": int(seed), "weight": float(weight)}
  if world:
    entry["world"] = dict(world)
  return entry


def base_config() -> mlc.ConfigDict:
  """The base: official pre-training settings with an empty data mixture.

  Official settings: docs/fidelity.md#optimiser-and-schedule, docs/fidelity.md#training-loop.
  """
  c = mlc.ConfigDict()
  # What the run trains: 'pretrain' or a fine-tuning task (x2vlm_jax/tasks.py).
  c.task = "pretrain"

  c.model = mlc.ConfigDict()
  c.model.variant = "base"  # tiny | base | large (x2vlm_jax/models/config.py)
  c.model.image_res = 224
  c.model.frame_len = 0  # > 0 adds the learned frame embedding (stage 2 with video: 3)
  c.model.dtype = "bfloat16"  # compute dtype; parameters and optimizer state stay float32
  c.model.remat = False
  # '' = `remat` for every tower; else a policy (none | full | save_matmuls | save_dots |
  # save_all_but_attention) for every tower, or per tower
  # "vision=save_matmuls,text=none,fusion=full" (docs/train_step.md#rematerialisation).
  c.model.remat_policy = ""
  # Attention core: einsum | xla | cudnn (x2vlm_jax/models/attention.py).
  c.model.attention = "einsum"
  # Layers per iteration of each tower's layer loop: 1 = rolled; a number >= the tower's depth
  # = unrolled (faster on small op-bound models, slower on base, longer compile;
  # docs/benchmarks.md#unrolled-layer-loops).
  c.model.scan_unroll = 1
  # '' = the variant's text tower; else a BERT directory ('minilm' allowed) whose config.json
  # sizes the text tower (fusion heads / FFN follow it).
  c.model.text_config_from = ""
  # Drop path on the text / fusion layers' branches, linspace(0, rate) over depth (0 in
  # pre-training; the RefCOCO+ fine-tune sets 0.1 each, docs/fidelity.md#text-drop-path).
  c.model.text_drop_path = 0.0
  c.model.fusion_drop_path = 0.0

  c.init = mlc.ConfigDict()
  # From-scratch pre-training loads BERT (text + fusion copies) and BEiT-2 (vision),
  # docs/fidelity.md#initial-weights-from-bert-and-beit-2.
  # bert_dir may be 'minilm' (the MiniLM-L6 BERT shipped as a package, x2vlm_jax/assets.py).
  c.init.bert_dir = ""
  c.init.beit_path = ""
  # An official X2-VLM .th (docs/fidelity.md#continued-pre-training).
  c.init.official_th = ""
  c.init.params_dir = ""  # our own params directory (params_io.save_params; e.g. an export)
  # A training run's workdir (or its checkpoints dir): the parameters of its newest good
  # checkpoint, resized to this model (docs/conversion.md#fine-tuning-initialisation).
  c.init.checkpoint = ""

  c.data = mlc.ConfigDict()
  c.data.tokenizer = ""  # tokenizer directory; '' = init.bert_dir; 'minilm' = the packaged one
  c.data.max_tokens = 40
  c.data.max_masks = 12
  c.data.mask_prob = 0.5
  c.data.skipgram_prb = 0.2
  c.data.skipgram_size = 3
  c.data.mask_whole_word = True
  c.data.min_perc_in_image = 0.5
  c.data.max_regions = 5
  c.data.randaugment = True
  c.data.crop_scale = (0.2, 1.0)
  # Pre-training flips without editing texts (docs/fidelity.md#horizontal-flips-never-edit-text).
  c.data.careful_hflip = False
  c.data.hflip = True  # random horizontal flips of images, frames and region crops
  # Region boxes: False truncates pixel boxes to integers as pre-training does; True keeps them
  # fractional as the official grounding fine-tuning does (docs/data.md).
  c.data.exact_boxes = False
  # Per-kind source lists (see `source` / `synthetic` above); mixture weights inside entries.
  c.data.image = []
  c.data.region = []
  c.data.video = []
  # Aux streams (docs/fidelity.md#aux-streams): with probability loss.aux_iter_perc[kind] a step
  # takes that kind's batch from these sources instead of the main ones. 1B stage 1: clean images;
  # stage 2: WebVid.
  c.data.aux = mlc.ConfigDict({"image": [], "video": []})
  c.data.num_workers = 0  # worker processes per kind and stream (grain mp_prefetch)
  c.data.worker_buffer_size = 4
  c.data.read_threads = 1

  c.batch = mlc.ConfigDict()
  # GLOBAL sizes: summed over all processes/devices. The official configs give per-GPU sizes;
  # each released config below writes them as per_gpu x world_size.
  c.batch.image = 0
  c.batch.region = 0  # region/object texts
  c.batch.region_max_images = 0  # image slots of the region sub-batch
  c.batch.video = 0
  c.batch.frame_len = 3

  c.loss = mlc.ConfigDict()
  c.loss.iter_perc = mlc.ConfigDict({"image": 1.0, "region": 1.0, "video": 1.0})
  # Per-term weights inside every kind; all 1 in the official code
  # (docs/fidelity.md#loss-weights-and-total).
  c.loss.term_weights = mlc.ConfigDict(
    {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "box_l1": 1.0, "box_giou": 1.0}
  )
  c.loss.itm = True  # False: never compute ITM
  c.loss.stop_calc_itm = -1  # ITM only for steps < this; -1 = always (official default: inf)
  # 0 = ordinary gradients (default). W > 0 reproduces the official 1/W ITC gradient on the
  # encoders of a W-GPU run (docs/fidelity.md#itc-gradient-scaling).
  c.loss.itc_grad_world_size = 0
  # ITM hard negatives per data shard, 0 = per device slice (docs/fidelity.md#itm-hard-negatives).
  c.loss.neg_shards = 0
  c.loss.aux_iter_perc = mlc.ConfigDict({"image": 0.0, "video": 0.0})

  total_steps = config_dict.FieldReference(1000)
  c.optim = mlc.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.lr_mult = 2.0
  c.optim.clip_norm = 1.0
  # The schedule ends with the run: a derived reference follows train.total_steps until it is
  # set explicitly (large-4M: a 504,495-step schedule stopped at 250K; tests).
  c.optim.total_steps = total_steps + 0
  c.optim.warmup_steps = 2500.0  # steps, or a fraction of total_steps when < 1
  c.optim.min_lr = 0.0
  # Per-tower rates (fine-tuning): typed None so `--config.optim.vision_lr=1e-5` parses as float.
  c.optim.vision_lr = config_dict.placeholder(float)
  c.optim.text_lr = config_dict.placeholder(float)
  c.optim.fusion_lr = config_dict.placeholder(float)

  c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  c.train = mlc.ConfigDict()
  c.train.total_steps = total_steps
  c.train.seed = 42  # the official runs re-seed every rank with 42 (docs/fidelity.md#seeds)
  c.train.accum_steps = 1
  c.train.log_every = 50
  c.train.ckpt_every = 5000
  c.train.keep = 3  # newest checkpoints kept
  # Additionally kept forever: the official save frequency (docs/fidelity.md#checkpoint-frequency).
  c.train.keep_every = 50_000
  c.train.async_checkpoint = True
  c.train.eval_every = 0  # 0 = no periodic evaluation
  c.train.max_consecutive_nonfinite = 20
  c.train.export_at_end = True  # params dir + official .th (needs torch) + safetensors
  c.train.profile_steps = ""  # 'first,last' (e.g. '10,15'): JAX profiler trace in workdir/profile
  c.train.peak_tflops = 0.0  # per-device peak, for MFU in the progress line (0 = not shown)
  c.train.compilation_cache_dir = ""  # persistent XLA compilation cache ('' = off)
  # CPU experiments: compile the step with XLA's cheap backend options (much shorter compile,
  # slower steps; docs/benchmarks.md#compile-time-on-cpu). No effect on GPU / TPU.
  c.train.fast_compile = False
  # CPU backend, read by train.py at start-up (x2vlm_jax/cpu_host.py): glibc keeps the step's
  # memory mapped between steps (official-tiny step 25 % faster); sync dispatch runs steps on the
  # loop's thread (no page faults at any size, but the input pipeline no longer overlaps the
  # step: for base-size models only).
  c.train.cpu_host_tuning = True
  c.train.cpu_sync_dispatch = False
  c.train.log_example_ids = False  # per-step (source, record) ids per kind -> example_ids.*.jsonl
  # Model selection: after each evaluation, a better value of this metric (e.g.
  # 'eval/retrieval/val/r_mean') writes the parameters to <workdir>/best/ ('' = off).
  c.train.select_metric = ""
  c.train.select_mode = "max"  # or 'min'
  c.train.stop_after = -1  # end the run (saving) after this step, < total_steps (tests; -1 off)

  # Evaluation (x2vlm_jax/evaluators/run.py): names to run, e.g. ('retrieval', 'grounding'),
  # plus one section per evaluator with its data (configs/demo.py shows a complete one).
  c.eval = mlc.ConfigDict()
  c.eval.evaluators = ()
  c.eval.batch_size = 32
  # Every evaluator's section with its defaults and no data, so any config can switch one on from
  # flags: --config.eval.evaluators=retrieval --config.eval.retrieval.data=json:/d/test.json
  for name, settings in EVALUATORS.items():
    fields = {f.name: f.default for f in dataclasses.fields(settings) if f.name != "data"}
    c.eval[name] = mlc.ConfigDict({"data": [], **fields})
  return c


def pretrain_config(variant: str) -> mlc.ConfigDict:
  """The 4M pre-training base: BERT + BEiT-2 init, 4M image and region data.

  Data paths default to the official file layout under `data/`; point them at your
  copies with `--config.data.image=...` or edit a copy of the config.
  """
  c = base_config()
  c.model.variant = variant
  bert = {"base": "data/bert-base-uncased", "large": "data/bert-large-uncased-12l"}[variant]
  c.init.bert_dir = bert
  c.init.beit_path = {
    "base": "data/beitv2_base_patch16_224_pt1k_ft21k.pth",
    "large": "data/beitv2_large_patch16_224_pt1k_ft21k.pth",
  }[variant]
  c.data.image = [source(f"data/pretrain_4m/{name}") for name in ("coco", "vg", "sbu", "cc3m")]
  c.data.region = [
    source(f"data/pretrain_4m/{name}")
    for name in (
      "coco_objs",
      "vg_objs",
      "vg_regions",
      "refcoco_regions",
      "gqa_objs",
      "flickr_entities",
    )
  ]
  c.data.num_workers = 6
  # Keep only the weight-matmul outputs for the backward pass (recompute the attention core and
  # the element-wise work): base mixed step on the 2-core CPU peak memory 11.49 -> 7.07 GB (8.02
  # GiB RSS; the official PyTorch step 8.8 GiB) at the same speed within noise (14.6-14.8 s vs
  # 15.3-18.2 s; official 24.7-27.3 s), docs/benchmarks.md. GPU rows of both: bench/gpu.sh.
  # `remat_policy = "none"` turns it off.
  c.model.remat_policy = "save_matmuls"
  return c


OPENIMAGES_OBJECTS365 = ("openimages_v6", "objects365")


def use_1b_regions(c: mlc.ConfigDict) -> None:
  """Adds the 1B region sources (OpenImages-v6 and Objects365) to the 4M ones."""
  c.data.region = list(c.data.region) + [
    source(f"data/pretrain_1b/{n}") for n in OPENIMAGES_OBJECTS365
  ]


def use_video(c: mlc.ConfigDict, per_gpu: int, world: int) -> None:
  """Stage-2 video: HowTo100M + YT-Temporal main stream, WebVid-2.5M aux with p 0.35."""
  c.model.frame_len = 3
  c.batch.frame_len = 3
  c.batch.video = per_gpu * world
  c.data.video = [
    source("data/video/howto100m_filtered"),
    source("data/video/yt_temporal_filtered"),
  ]
  c.data.aux.video = [source("data/video/webvid_2.5m")]
  c.loss.aux_iter_perc.video = 0.35


def parse_arg(arg: str | None) -> dict[str, str]:
  """'a=1,b' -> {'a': '1', 'b': ''}: the config-string convention of `get_config(arg)`."""
  out = {}
  for part in (arg or "").split(","):
    if part:
      k, _, v = part.partition("=")
      out[k.strip()] = v.strip()
  return out
