"""The shared base of the MVPTR fine-tuning configs (docs/mvptr.md#fine-tuning): a task of
`x2vlm_jax/tasks_mvptr_finetune.py` on the one training loop, starting from the parameters of a
pre-training run's newest checkpoint (stage 2; the pre-training heads are dropped, the task's
head starts from its initializer).

Official settings (README commands; MVPTR_REFERENCE.md section 5): AdamW (eps 1e-8, betas
0.9/0.999), weight decay 0.05 except biases and LayerNorms, linear decay to 0 without warm-up,
gradient clipping 1.0, dropout 0.1, one learning rate for every parameter; per-GPU batches x 8
GPUs. Periodic evaluation on the held-out split every `eval_every` steps, the best parameters
kept (`train.select_metric`).
"""

from __future__ import annotations

import math

import ml_collections as mlc

from configs import common
from configs.mvptr import common as mc

GPUS = 8


def finetune_config(task: str, heads: str, variant: str = "base") -> mlc.ConfigDict:
  """Fine-tuning `task` (e.g. 'mvptr_retrieval') of MVPTR with `heads` (no data, no steps)."""
  c = common.base_config()
  c.task = task
  c.model.family = "mvptr"
  c.model.variant = variant
  c.model.mvptr = mlc.ConfigDict({"heads": heads})
  c.data.tokenizer = "data/bert-base-uncased"
  c.data.mvptr = mc.data_section("")
  c.loss.mvptr = mlc.ConfigDict()
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.05
  c.optim.lr_mult = 1.0
  c.optim.clip_norm = 1.0
  c.optim.warmup_steps = 0
  return c


def steps(epochs: int, pairs: int, batch: int) -> int:
  """`epochs` over `pairs` training rows in updates of `batch`."""
  return math.ceil(epochs * pairs / batch)


def heldout(spec: str) -> list[dict]:
  """One evaluation split entry: an Oscar-layout spec file (`evaluators/mvptr_run.py`)."""
  return [{"type": "oscar", "spec": spec}]


def retrieval_eval(spec: str, k_c: int, k_i: int, split: str = "val") -> mlc.ConfigDict:
  """The `eval.mvptr_retrieval` section on one held-out split."""
  return mlc.ConfigDict({"data": {split: heldout(spec)}, "k_c": k_c, "k_i": k_i, "max_images": 0})


def grounding_eval(spec: str, variant: str, split: str = "val") -> mlc.ConfigDict:
  """The `eval.mvptr_grounding` section on one held-out split of a layout with grounding targets."""
  return mlc.ConfigDict({"data": {split: heldout(spec)}, "variant": variant, "max_phrases": 0})


def retrieval_config(opts: dict, per_gpu: int, epochs: int) -> mlc.ConfigDict:
  """Retrieval at the official settings: lr 4e-5, lengths 50 / 30 tags / 50 regions / 5
  phrases, k_c 128 / k_i 64, selection on the held-out split's re-ranked r_mean."""
  c = finetune_config("mvptr_retrieval", "retrieval")
  c.data.mvptr.update(
    {"spec": opts["spec"], "max_tokens": 50, "max_tags": 30, "max_regions": 50, "max_phrases": 5}
  )
  c.init.checkpoint = opts["stage2"]
  c.batch.image = per_gpu * GPUS
  c.optim.lr = 4e-5
  c.train.total_steps = steps(epochs, int(opts["pairs"]), c.batch.image)
  c.train.eval_every = math.ceil(int(opts["pairs"]) / c.batch.image)  # once per epoch
  c.eval.evaluators = ("mvptr_retrieval",)
  c.eval.mvptr_retrieval = retrieval_eval(opts["val"], k_c=128, k_i=64)
  c.train.select_metric = "eval/mvptr_retrieval/val/r_mean"
  return c


def task_eval(spec: str, split: str = "val") -> mlc.ConfigDict:
  """The `eval.mvptr_vqa` / `eval.mvptr_ve` section on one held-out task spec."""
  return mlc.ConfigDict({"data": {split: [{"type": "task", "spec": spec}]}, "max_rows": 0})


TASK_METRIC = {"mvptr_vqa": "score", "mvptr_ve": "acc"}


def task_config(task: str, opts: dict, per_gpu: int, epochs: int, lengths: dict):
  """VQA / SNLI-VE at the official settings: the task spec `spec` (data_pipelines/
  mvptr_task_sources.py) of `pairs` training rows, the held-out spec `val`, from `stage2`,
  evaluated once per epoch, the best `score` / `acc` kept."""
  heads = task.removeprefix("mvptr_")
  c = finetune_config(task, heads)
  c.data.mvptr.update({"spec": opts["spec"], **lengths})
  c.init.checkpoint = opts["stage2"]
  c.batch.image = per_gpu * GPUS
  c.train.total_steps = steps(epochs, int(opts["pairs"]), c.batch.image)
  c.train.eval_every = math.ceil(int(opts["pairs"]) / c.batch.image)  # once per epoch
  c.eval.evaluators = (task,)
  c.eval[task] = task_eval(opts["val"])
  c.train.select_metric = f"eval/{task}/val/{TASK_METRIC[task]}"
  return c
