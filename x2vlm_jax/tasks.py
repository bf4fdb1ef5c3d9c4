"""The tasks the one training loop runs: pre-training and the fine-tuning tasks.

A task is the part of a run that is not shared: which batch kinds it trains on, which X²-VLM
objectives its loss computes (`objectives.py`) and whether rows that share an image id are each
other's positives, and which evaluators report on it. Everything else -- the loop, checkpoints,
resume, preemption, non-finite skipping, progress, TensorBoard, evaluation cadence, model
selection, export -- is the same code for every task (`train_lib.py`). A config names its task
(`config.task`); `TASKS` is the one table of them.

  pretrain          image, region and video kinds; ITC + ITM + MLM + box (the official step)
  retrieval         image kind; ITC with image-id soft targets + ITM with same-image pairs never
                    drawn as negatives (docs/finetuning.md#image-text-retrieval)
  video_retrieval   the same on the video kind (docs/finetuning.md#video-text-retrieval)
  grounding         region kind, one referring expression per image; the box loss (L1 + GIoU)
                    on the full image (docs/finetuning.md#referring-expression-grounding)
  vqa               image kind + answers; the answer decoder's weighted LM loss
                    (tasks_vqa.py, docs/finetuning.md#vqa-v2)
  nlvr2             image kind + a second image + label; cls_head on both fused [CLS]
                    (tasks_cls.py, docs/finetuning.md#nlvr2)
  caption           image kind + the caption with inserted [MASK]s; the MLM head's label-smoothed
                    loss, UniLM-style left to right (tasks_caption.py,
                    docs/finetuning.md#captioning)
  video_qa          video kind + answer class; cls_head on the fused [CLS]
                    (tasks_cls.py, docs/finetuning.md#video-qa)
  mvptr_stage1      MVPTR (model.family 'mvptr'), image kind = region features + tags +
                    phrases + caption; MCR^v + MCR^s + VSC on the uni-modal stacks
                    (tasks_mvptr_pretrain.py, docs/mvptr.md#training)
  mvptr_stage2      the same batches; all six MVPTR objectives
  mvptr_retrieval   MVPTR fine-tuning: unmasked pairs; VSC + ITM with the retrieval classifier
                    (tasks_mvptr_finetune.py, docs/mvptr.md#fine-tuning)
  mvptr_grounding   one row per grounded phrase; phrase-region cosine regressed on IoU
  mvptr_vqa         VQA rows (official run_vqa.py files); BCE of the MLM-initialised answer head
  mvptr_ve          SNLI-VE rows (official run_ve.py files); 3-way classifier CE
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from jax.sharding import Mesh

from data_pipelines import features as F
from x2vlm_jax import objectives, tasks_caption, tasks_cls, tasks_mvptr_pretrain, tasks_vqa
from x2vlm_jax import tasks_mvptr_finetune as mvptr_ft


@dataclasses.dataclass(frozen=True)
class Task:
  """One task: its batch kinds, objectives and evaluators (see the module docstring).

  A task whose loss is not a selection of the X²-VLM objectives (a classification head, an
  answer decoder, ...) gives `loss`: `loss(step_cfg, mesh) -> loss(model, batch, key, itm)`,
  written in its own module next to this table; its heads are optional parts of the model
  (`ModelConfig`), so checkpoints, sharding and conversion treat them like any parameter.
  """

  name: str
  kinds: tuple[str, ...]  # batch kinds it may train on
  objectives: tuple[str, ...]  # subset of ('itc', 'itm', 'mlm', 'box'); () with a custom loss
  image_ids: bool = False  # rows with equal `image_id` are positives of each other
  evaluators: tuple[str, ...] = ()  # evaluators that report on this task
  loss: Callable[[objectives.StepConfig, Mesh | None], Callable] | None = None
  fields: str = ""  # kind-specific batch fields (features.TASK_KIND key), '' = none
  family: str = "x2vlm"  # the model family it trains (config.model.family)

  def make_loss(self, step_cfg: objectives.StepConfig, mesh: Mesh | None):
    """`loss(model, batch, key, itm) -> (loss, metrics)` of the task's train step."""
    if self.loss is not None:
      return self.loss(step_cfg, mesh)
    cfg = dataclasses.replace(step_cfg, objectives=self.objectives, image_ids=self.image_ids)
    return objectives.make_loss(cfg, mesh)

  def check_batch(self, sizes: Mapping[str, int]) -> None:
    """Raises naming the config field if the batch uses a kind the task does not train on."""
    extra = [k for k, n in sizes.items() if n and k not in self.kinds]
    if extra:
      raise ValueError(
        f"task {self.name!r} trains on {list(self.kinds)}; set config.batch.{extra[0]} = 0"
      )
    if not any(sizes.get(k) for k in self.kinds):
      raise ValueError(f"task {self.name!r} needs a batch of {' or '.join(self.kinds)}")


TASKS = {
  "pretrain": Task(
    "pretrain", F.KINDS, ("itc", "itm", "mlm", "box"), evaluators=("retrieval", "grounding")
  ),
  "retrieval": Task(
    "retrieval", (F.IMAGE,), ("itc", "itm"), image_ids=True, evaluators=("retrieval",)
  ),
  "video_retrieval": Task(
    "video_retrieval", (F.VIDEO,), ("itc", "itm"), image_ids=True, evaluators=("retrieval",)
  ),
  "grounding": Task("grounding", (F.REGION,), ("box",), evaluators=("grounding",)),
  "vqa": Task("vqa", (F.IMAGE,), (), evaluators=("vqa",), loss=tasks_vqa.make_loss, fields=F.VQA),
  "nlvr2": Task(
    "nlvr2", (F.IMAGE,), (), evaluators=("nlvr2",), loss=tasks_cls.make_nlvr2_loss, fields=F.NLVR2
  ),
  "caption": Task(
    "caption",
    (F.IMAGE,),
    (),
    evaluators=("caption",),
    loss=tasks_caption.make_loss,
    fields=F.CAPTION,
  ),
  "video_qa": Task(
    "video_qa",
    (F.VIDEO,),
    (),
    evaluators=("video_qa",),
    loss=tasks_cls.make_video_qa_loss,
    fields=F.VIDEO_QA,
  ),
  "mvptr_stage1": Task(
    "mvptr_stage1", (F.IMAGE,), (), loss=tasks_mvptr_pretrain.stage_loss(1), family="mvptr"
  ),
  "mvptr_stage2": Task(
    "mvptr_stage2", (F.IMAGE,), (), loss=tasks_mvptr_pretrain.stage_loss(2), family="mvptr"
  ),
  **{
    f"mvptr_{name}": Task(
      f"mvptr_{name}", (F.IMAGE,), (), evaluators=(f"mvptr_{name}",), loss=loss, family="mvptr"
    )
    for name, loss in (
      ("retrieval", mvptr_ft.retrieval_loss),
      ("grounding", mvptr_ft.grounding_loss),
      ("vqa", mvptr_ft.vqa_loss),
      ("ve", mvptr_ft.ve_loss),
    )
  },
}


def get(name: str) -> Task:
  """The task called `name` (config.task); an unknown name lists the known ones."""
  if name not in TASKS:
    raise ValueError(f"config.task = {name!r} is not a task; known tasks: {sorted(TASKS)}")
  return TASKS[name]
