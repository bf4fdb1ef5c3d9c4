"""MVPTR pre-training terms for one batch, composed by name (docs/mvptr.md#composed-terms).

`pretrain_terms(model, batch, key, settings)` runs the uni-modal stacks once, the cross-modal
stack once for the positives and once for the ITM negatives (only when a stage-2 term has
weight), and returns (weighted total, metrics). Per-objective paper/code switches and weights are
`MvptrObjectives`; `MvptrObjectives.stage(1 | 2)` are the paper's two stages (stage 1: MCR^v +
MCR^s + VSC on the uni-modal stacks only, no cross-modal pass at all; stage 2: all six).

Batch (arrays; -1 labels = not a target):
  text_ids, text_mask, text_labels [B, L_A]: stream A, its masked-word labels (MLM);
  phrase_positions, phrase_valid, phrase_labels [B, P]: slot in stream A of each phrase, 1 for
    a real phrase (WPG), the original phrase id of a masked phrase (textual MCR);
  tag_ids, tag_mask, tag_labels [B, T]: stream B's tag part and its masked-tag labels (MCR^v);
  regions [B, R, region_dim], region_mask [B, R].

The paper's Hungarian label assignment runs in the graph on stop-gradient probabilities
(`mvptr_assign.hungarian_targets`, an exact solver; no host callback, so the step shards).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from x2vlm_jax import losses, mvptr_assign
from x2vlm_jax import mvptr_losses as ML

NAMES = ("mcr_v", "mcr_s", "vsc", "wpg", "itm", "mlm")
JOINT = ("wpg", "itm", "mlm")  # the terms that need the cross-modal stack


@dataclasses.dataclass(frozen=True)
class MvptrObjectives:
  """Variant ("paper" | "code") per objective where they differ, and the weights by name."""

  mcr_v: str = "paper"
  mcr_s: str = "paper"  # needs a model with `phrase_head` (the code variant does not)
  vsc: str = "paper"
  wpg: str = "paper"
  itm: str = "paper"
  # Device count of the code variants' per-device batches: the VSC softmax, the ITM negatives
  # and the WPG negative image are each taken within one device's block of the batch.
  vsc_shards: int = 1
  weights: tuple[tuple[str, float], ...] = tuple((n, 1.0) for n in NAMES)

  def __post_init__(self):
    for name in ("mcr_v", "mcr_s", "vsc", "wpg", "itm"):
      if getattr(self, name) not in ML.VARIANTS:
        raise ValueError(f"MvptrObjectives.{name} must be one of {ML.VARIANTS}")
    unknown = set(dict(self.weights)) - set(NAMES)
    if unknown:
      raise ValueError(f"MvptrObjectives.weights: unknown objectives {sorted(unknown)}")

  def weight(self, name: str) -> float:
    return float(dict(self.weights).get(name, 0.0))

  @classmethod
  def stage(cls, n: int, **kw) -> "MvptrObjectives":
    """The paper's stage 1 (uni-modal: MCR^v, MCR^s, VSC) or stage 2 (all six), weight 1."""
    if n not in (1, 2):
      raise ValueError(f"MVPTR has stages 1 and 2, got {n}")
    on = ("mcr_v", "mcr_s", "vsc") if n == 1 else NAMES
    return cls(weights=tuple((name, 1.0 if name in on else 0.0) for name in NAMES), **kw)


def _hungarian(logits, labels):
  """In-graph Hungarian re-assignment of the masked concept labels (stop-gradient probs)."""
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits.astype(jnp.float32)), axis=-1)
  return mvptr_assign.hungarian_targets(probs, labels)


def _uni_modal_terms(model, batch, keys, s: MvptrObjectives, terms: dict):
  text = model.encode_text(batch["text_ids"], batch["text_mask"], key=keys[0])
  vis = model.encode_vision(
    batch["tag_ids"], batch["tag_mask"], batch["regions"], batch["region_mask"], key=keys[1]
  )
  ntag = batch["tag_ids"].shape[1]
  labels = batch["tag_labels"]
  logits = model.tag_mlm_logits(vis[:, :ntag])  # [B, T, word vocab]
  if s.mcr_v == "paper":
    labels = _hungarian(logits, labels)
  terms["mcr_v"], _ = ML.mcr_loss(logits, labels, labels >= 0)
  # Textual MCR: paper over the whole table at the phrase slots, Hungarian-matched; code: none.
  if s.mcr_s == "paper" and s.weight("mcr_s") > 0:
    pos = batch["phrase_positions"]
    h = jnp.take_along_axis(text, pos[..., None], axis=1)  # [B, P, D]
    logits = model.phrase_logits(h)  # [B, P, vocab]
    labels = _hungarian(logits, batch["phrase_labels"])
    terms["mcr_s"], _ = ML.mcr_loss(logits, labels, labels >= 0)
  else:
    terms["mcr_s"], _ = ML.mcr_loss(None, None, None, enabled=False)
  t, v = model.global_features(text, vis)
  terms["vsc"] = ML.vsc_loss(t, v, model.logit_scale[...], variant=s.vsc, shards=s.vsc_shards)
  return text, vis, t, v


def _joint_terms(model, batch, keys, s: MvptrObjectives, uni, terms: dict):
  text, vis, t, v = uni
  la, ntag = batch["text_ids"].shape[1], batch["tag_ids"].shape[1]
  a_mask, r_mask = batch["text_mask"], batch["region_mask"]
  regions = model.region_slots(vis, ntag)
  joint = model.fuse(text, a_mask, regions, r_mask, keys[2], phrase=True)
  logits = model.mlm_logits(joint.sequence[:, :la])
  terms["mlm"], _ = losses.mlm_loss(logits, batch["text_labels"], batch["text_labels"] >= 0)
  sim, scale = jax.lax.stop_gradient(t @ v.T), jax.lax.stop_gradient(model.logit_scale[...])
  mode, n = ("sample", 1) if s.itm == "paper" else ("hardest", s.vsc_shards)
  hard_img = ML.pick_negatives(keys[3], sim, scale, mode, shards=n)
  hard_txt = ML.pick_negatives(keys[4], sim.T, scale, mode, shards=n)
  ti, ii = ML.itm_pairs(keys[5], hard_img, hard_txt, shards=n)
  neg = model.fuse(text[ti], a_mask[ti], regions[ii], r_mask[ii], keys[6])
  terms["itm"] = ML.itm_loss(model.itm_logits(joint.pooled), model.itm_logits(neg.pooled))
  # WPG: paper at the phrase layer, negative image from the VSC distribution; code at the last
  # layer, a uniformly random other image. Negative regions come from that image's own pass.
  states = joint.phrase_state if s.wpg == "paper" else joint.sequence
  phrases = jnp.take_along_axis(states, batch["phrase_positions"][..., None], axis=1)
  regs = states[:, la:]
  mode, n = ("sample", 1) if s.wpg == "paper" else ("uniform", s.vsc_shards)
  other = ML.pick_negatives(keys[7], sim, scale, mode, shards=n)
  slots = batch["phrase_valid"]
  kw = dict(variant=s.wpg, key=keys[8])
  pos = ML.phrase_region_score(phrases, slots, regs, r_mask, **kw)
  negs = ML.phrase_region_score(phrases, slots, regs[other], r_mask[other], **kw)
  terms["wpg"] = ML.wpg_loss(pos, negs, slots)


def pretrain_terms(model, batch, key, s: MvptrObjectives):
  """(total, metrics) of one batch; `key` None = no dropout (the negatives still need a key, so
  a fixed one is used). Terms with weight 0 are reported but add nothing."""
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  keys = jax.random.split(jax.random.key(0) if key is None else key, 9)
  drop = [None] * 3 if key is None else list(keys[:3])
  keys = drop + list(keys[3:])
  terms: dict = {}
  uni = _uni_modal_terms(model, batch, keys, s, terms)
  if any(s.weight(n) > 0 for n in JOINT):
    _joint_terms(model, batch, keys, s, uni, terms)
  total = sum(s.weight(n) * terms[n] for n in terms)
  metrics = {f"loss/{n}": terms[n] for n in terms}
  metrics["logit_scale"] = model.logit_scale[...]
  return total, metrics
