"""The MVPTR fine-tuning tasks of the one training loop (docs/mvptr.md#fine-tuning): the pure
losses of `tasks_mvptr.py` on the image kind's rows, with the config's `loss.mvptr` section:

  mvptr_retrieval   unmasked pairs (`data.mvptr`, rates forced to 0); VSC + ITM re-ranking
                    head. Keys: vsc 'paper' | 'code', vsc_shards (0 = the mesh's batch shards),
                    itm_negatives 'hardest' (code) | 'sample'
  mvptr_grounding   one row per grounded phrase (`data_pipelines/mvptr_grounding_stream.py`);
                    phrase-region cosine regressed on IoU. Key: grounding 'code' | 'paper'
  mvptr_vqa         VQA rows (`data_pipelines/mvptr_task_sources.py`, official run_vqa.py
                    files); BCE of the VQA head vs the soft scores. No keys. The head starts
                    from the MLM rows of each answer's word pieces (`init_mvptr`)
  mvptr_ve          SNLI-VE rows (official run_ve.py files); 3-way CE. No keys

The model carries the task's heads (`config.model.mvptr.heads`, checked here before anything
compiles); evaluation: `evaluators/mvptr_run.py`. Errors name the config field.
"""

from __future__ import annotations

from collections.abc import Mapping

from jax.sharding import Mesh

from data_pipelines import features as F
from x2vlm_jax import mvptr_losses as ML
from x2vlm_jax import sharding
from x2vlm_jax import tasks_mvptr as TM

SECTION = "config.loss.mvptr"
KEYS = {
  "retrieval": {"vsc": "paper", "vsc_shards": 1, "itm_negatives": "hardest"},
  "grounding": {"grounding": "code"},
  "vqa": {},
  "ve": {},
}
CHOICES = {
  "vsc": ML.VARIANTS,
  "itm_negatives": TM.ITM_NEGATIVES,
  "grounding": TM.GROUNDING_VARIANTS,
}


def settings(task: str, section: Mapping | None) -> dict:
  """The task's `loss.mvptr` settings with their defaults (checked, naming the field)."""
  given, known = dict(section or {}), KEYS[task]
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(f"{SECTION}: unknown keys {unknown} for mvptr_{task}; known: {list(known)}")
  out = {**known, **given}
  for key, choices in CHOICES.items():
    if key in out and out[key] not in choices:
      raise ValueError(f"{SECTION}.{key} = {out[key]!r}: expected one of {list(choices)}")
  return out


def _check_heads(model, task: str) -> None:
  if model.cfg.heads != task:
    raise ValueError(
      f"task mvptr_{task} needs config.model.mvptr.heads = {task!r}, got {model.cfg.heads!r}"
    )


def retrieval_loss(step_cfg, mesh: Mesh | None):
  """`make_loss` of `mvptr_retrieval` (a `tasks.Task.loss`)."""
  s = settings("retrieval", step_cfg.mvptr)
  shards = int(s["vsc_shards"]) or (sharding.batch_shards(mesh) if mesh else 1)

  def loss(model, batch, key, itm: bool):
    del itm  # ITM is part of every step of the task
    _check_heads(model, "retrieval")
    return TM.retrieval_loss(
      model,
      batch[F.IMAGE],
      None if step_cfg.deterministic else key,
      vsc=s["vsc"],
      vsc_shards=shards,
      itm_negatives=s["itm_negatives"],
    )

  return loss


def grounding_loss(step_cfg, mesh: Mesh | None):
  """`make_loss` of `mvptr_grounding` (a `tasks.Task.loss`)."""
  del mesh
  s = settings("grounding", step_cfg.mvptr)

  def loss(model, batch, key, itm: bool):
    del itm
    _check_heads(model, "grounding")
    b = batch[F.IMAGE]
    return TM.grounding_loss(
      model, b, None if step_cfg.deterministic else key, variant=s["grounding"]
    )

  return loss


def _classify_loss(task: str):
  """`make_loss` of `mvptr_vqa` / `mvptr_ve`: the pure loss of `tasks_mvptr.LOSSES`."""

  def make(step_cfg, mesh: Mesh | None):
    del mesh
    settings(task, step_cfg.mvptr)  # no keys: any is an error naming the field

    def loss(model, batch, key, itm: bool):
      del itm
      _check_heads(model, task)
      return TM.LOSSES[task](model, batch[F.IMAGE], None if step_cfg.deterministic else key)

    return loss

  return make


vqa_loss = _classify_loss("vqa")
ve_loss = _classify_loss("ve")
