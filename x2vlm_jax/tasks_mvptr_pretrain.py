"""The MVPTR pre-training tasks `mvptr_stage1` / `mvptr_stage2` (docs/mvptr.md#training): the
paper's two stages as losses of the one training loop.

The loss is `mvptr_objectives.pretrain_terms` over the batch's image kind (the rows built by
`data_pipelines.mvptr_examples.build_example`), with `MvptrObjectives.stage(n)` as the base and
the config's `loss.mvptr` section on top:

  mcr_v, mcr_s, vsc, wpg, itm   'paper' | 'code' per objective (default paper)
  vsc_shards                    devices of the code's per-device VSC; 0 = the mesh's batch shards
  weights                       {objective: weight}; stage 1 may weight only mcr_v, mcr_s, vsc

Every setting is checked when the loss is made (before anything compiles); errors name the
field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jax.sharding import Mesh

from data_pipelines import features as F
from x2vlm_jax import mvptr_losses as ML
from x2vlm_jax import sharding
from x2vlm_jax.mvptr_objectives import JOINT, NAMES, MvptrObjectives, pretrain_terms

SECTION = "config.loss.mvptr"
VARIANTS = ("mcr_v", "mcr_s", "vsc", "wpg", "itm")


def _weights(stage: int, base: MvptrObjectives, given: Mapping) -> tuple:
  weights = dict(base.weights)
  for name, w in dict(given).items():
    if name not in NAMES:
      raise ValueError(f"{SECTION}.weights.{name}: not an MVPTR objective; known: {list(NAMES)}")
    w = float(w)
    if w < 0:
      raise ValueError(f"{SECTION}.weights.{name} = {w} must be >= 0")
    if stage == 1 and name in JOINT and w > 0:
      raise ValueError(
        f"{SECTION}.weights.{name} = {w}: stage 1 trains the uni-modal stacks only; "
        f"{', '.join(JOINT)} need the cross-modal stack (task mvptr_stage2)"
      )
    weights[name] = w
  if not any(weights.values()):
    raise ValueError(f"{SECTION}.weights: every objective has weight 0; nothing to train")
  return tuple(weights.items())


def objectives_for(stage: int, section: Mapping | None, batch_shards: int = 1) -> MvptrObjectives:
  """The stage's MvptrObjectives with the `loss.mvptr` overrides (checked, naming the field)."""
  section = dict(section or {})
  known = (*VARIANTS, "vsc_shards", "weights")
  unknown = sorted(set(section) - set(known))
  if unknown:
    raise ValueError(f"{SECTION}: unknown keys {unknown}; known: {list(known)}")
  variants = {}
  for name in VARIANTS:
    value = str(section.get(name, "paper"))
    if value not in ML.VARIANTS:
      raise ValueError(f"{SECTION}.{name} = {value!r}: expected one of {list(ML.VARIANTS)}")
    variants[name] = value
  shards = int(section.get("vsc_shards", 1))
  if shards < 0:
    raise ValueError(f"{SECTION}.vsc_shards = {shards} must be >= 0 (0 = the batch shards)")
  base = MvptrObjectives.stage(stage, vsc_shards=shards or batch_shards, **variants)
  return dataclasses.replace(base, weights=_weights(stage, base, section.get("weights") or {}))


def stage_loss(stage: int):
  """`make_loss(step_cfg, mesh)` of MVPTR stage `stage` (a `tasks.Task.loss`)."""

  def make_loss(step_cfg, mesh: Mesh | None):
    s = objectives_for(stage, step_cfg.mvptr, sharding.batch_shards(mesh) if mesh else 1)

    def loss(model, batch, key, itm: bool):
      del itm  # MVPTR's ITM is one of its weighted objectives
      if s.mcr_s == "paper" and s.weight("mcr_s") > 0 and not model.cfg.phrase_head:
        raise ValueError(
          f"{SECTION}.mcr_s = 'paper' (the paper's textual MCR) needs "
          "config.model.mvptr.phrase_head = True; or set it to 'code' (no phrase loss)"
        )
      total, metrics = pretrain_terms(
        model, batch[F.IMAGE], None if step_cfg.deterministic else key, s
      )
      return total, {**metrics, "loss/total": total}

    return loss

  return make_loss
