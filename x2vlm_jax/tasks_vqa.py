"""VQA v2 as the official code trains and answers it: a generative answer decoder, ranked over a
fixed answer list at inference (docs/finetuning.md#vqa-v2).

Question states: the image through the vision tower, the question through the text tower and
the fusion tower (all 18 official layers, every vision token visible) -> [B, L, Dt].

Training (`vqa_loss`): every answer slot of a question, `[CLS] answer [SEP]`, runs through the
decoder (causal self-attention, cross-attention to its question's states, own LM head),
teacher-forced; its loss is the summed next-token cross-entropy ([PAD] ignored, no label
smoothing); loss = sum over questions and answers of weight x answer loss / number of
questions (the official weights: an answer's share of the annotators' answers, 0.5 for
Visual Genome; empty slots weigh 0).

Inference (`rank_answers`): the decoder's first step from `[CLS]` gives every listed answer
the probability of its first token; the k best are re-run teacher-forced and scored
log p(first token) + sum of the teacher-forced token log-probabilities, which counts the first
token a second time and includes `[SEP]`, exactly as the official ranking; softmax over the
k scores, best first.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from data_pipelines import features as F
from x2vlm_jax.models.decoder import answer_log_probs
from x2vlm_jax.models.x2vlm import X2VLM


def split_keys(key: jax.Array | None, n: int, deterministic: bool) -> list:
  """n dropout keys of one step (all None when deterministic or without a key)."""
  if key is None or deterministic:
    return [None] * n
  return list(jax.random.split(key, n))


def question_states(model: X2VLM, pixels, ids, mask, keys=(None, None, None)) -> jax.Array:
  """Fused question states [B, L, Dt]: image [B, R, R, 3], question ids / mask [B, L]."""
  vision = model.encode_image(pixels, keys[0])  # [B, S, Dv]
  text = model.encode_text(ids, mask, keys[1])  # [B, L, Dt]
  vision_mask = jnp.ones(vision.shape[:2], jnp.int32)  # the whole image
  return model.fuse(text, mask, vision, vision_mask, key=keys[2])


def answer_losses(model: X2VLM, question, question_mask, answer_ids, answer_mask, key=None):
  """Summed teacher-forced loss of every answer slot: question [B, L, Dt], question_mask
  [B, L], answer ids / mask [B, A, La] -> [B, A] (0 for an empty slot)."""
  b, a, la = answer_ids.shape
  ids, mask = answer_ids.reshape(b * a, la), answer_mask.reshape(b * a, la)
  q_index = jnp.repeat(jnp.arange(b), a)  # [B*A] each row's question
  logits = model.answer_logits(ids, mask, question, question_mask[q_index], q_index, key)
  return -answer_log_probs(logits, ids, mask).sum(-1).reshape(b, a)


def vqa_loss(model: X2VLM, b: Mapping[str, jax.Array], key, deterministic: bool = False):
  """(loss, metrics) of one VQA batch (the image kind with the VQA fields)."""
  keys = split_keys(key, 4, deterministic)
  q = question_states(model, b[F.PIXELS], b[F.TEXT_IDS], b[F.TEXT_MASK], keys[:3])
  nll = answer_losses(model, q, b[F.TEXT_MASK], b[F.ANSWER_IDS], b[F.ANSWER_MASK], keys[3])
  valid = b[F.VALID].astype(jnp.float32)  # [B]
  weights = b[F.ANSWER_WEIGHTS].astype(jnp.float32) * valid[:, None]  # [B, A]
  loss = jnp.sum(weights * nll) / jnp.maximum(jnp.sum(valid), 1.0)
  return loss, {"loss/vqa/image": loss, "loss/total": loss}


def make_loss(step_cfg, mesh=None):
  """`loss(model, batch, key, itm)` of the 'vqa' task (`tasks.Task.loss`)."""
  del mesh

  def loss(model: X2VLM, batch, key, itm: bool = True):
    del itm
    return vqa_loss(model, batch[F.IMAGE], key, step_cfg.deterministic)

  return loss


def rank_answers(
  model: X2VLM, question, question_mask, answer_ids, answer_mask, k: int
) -> tuple[jax.Array, jax.Array]:
  """The official answer ranking (module docstring), deterministic.

  Args:
    question: fused question states [Nq, Lq, Dt]; question_mask [Nq, Lq].
    answer_ids, answer_mask: the answer list tokenised `[CLS] a [SEP]` [Na, La].
    k: candidates kept from the first-token probabilities (official k_test 128), <= Na.
  Returns:
    (answer indices [Nq, k], their probabilities [Nq, k]) best first.
  """
  answer_ids, answer_mask = jnp.asarray(answer_ids), jnp.asarray(answer_mask)
  question_mask = jnp.asarray(question_mask)
  nq, na = question.shape[0], answer_ids.shape[0]
  k = min(int(k), na)
  kv = model.question_kv(question)  # cross-attention K/V once per question
  start = jnp.broadcast_to(answer_ids[0, :1], (nq, 1))  # [CLS]
  first = model.answer_logits(start, jnp.ones((nq, 1), jnp.int32), kv, question_mask)[:, 0]
  prob_first = jax.nn.softmax(first, axis=-1)[:, answer_ids[:, 1]]  # [Nq, Na]
  top_prob, top = jax.lax.top_k(prob_first, k)  # [Nq, k]
  ids = answer_ids[top].reshape(nq * k, -1)
  mask = answer_mask[top].reshape(nq * k, -1)
  q_index = jnp.repeat(jnp.arange(nq), k)
  logits = model.answer_logits(ids, mask, kv, question_mask[q_index], q_index)
  seq = answer_log_probs(logits, ids, mask).sum(-1).reshape(nq, k)
  probs = jax.nn.softmax(jnp.log(top_prob) + seq, axis=-1)
  probs, order = jax.lax.top_k(probs, k)
  return jnp.take_along_axis(top, order, axis=1), probs
