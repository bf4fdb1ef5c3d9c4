"""MVPTR model: each stack, the embeddings, the joint pass, pooler and phrase-layer state against
transformers' PyTorch BERT with the same weights (tiny, random); sizes and sharding names."""

import numpy as np
import pytest
from flax import nnx

from tests import mvptr_testlib as M
from x2vlm_jax import sharding
from x2vlm_jax.models.mvptr import abstract_mvptr, count_mvptr_params
from x2vlm_jax.models.mvptr_config import MvptrConfig

CFG = MvptrConfig.tiny()


def test_base_parameter_count_and_sharding_names():
  # 3 x 6 BERT-base layers (7,087,872 each) + word/phrase table 86,051 x 768 + positions 512 x 768
  # + types 2 x 768 + LN + img_embedding 2054 x 768 + 768 + pooler + 2 bare projections + ITM
  # + two MLM heads (transform + 30,522 biases each) + logit_scale; decoders are tied.
  d, layer = 768, 7087872
  want = (
    18 * layer + (86051 + 512 + 2) * d + 2 * d + (2054 + 1) * d + (d + 1) * d + 2 * d * d
    + (d + 1) * 2 + 2 * ((d + 1) * d + 2 * d + 30522) + 1
  )  # fmt: skip
  assert count_mvptr_params(MvptrConfig.base()) == want == 198660471
  state = nnx.state(abstract_mvptr(CFG), nnx.Param)
  assert sharding.check_rules_cover(state) == []


def test_config_rejects_bad_sizes():
  with pytest.raises(ValueError, match="word_vocab_size"):
    MvptrConfig.tiny(word_vocab_size=200)
  with pytest.raises(ValueError, match="phrase_layer"):
    MvptrConfig.tiny(phrase_layer=3)


def test_stacks_match_transformers_bert():
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from tests import mvptr_torchlib as T

  model = M.random_model(CFG)
  x = M.inputs(CFG)
  ref = T.reference_forward(model, CFG, x, torch)
  ours = _forward(model, x, {k: ref[k] for k in ref if k.endswith(("_in", "_mask"))})
  errs = {k: float(np.max(np.abs(np.asarray(ours[k]) - ref[k]))) for k in ours}
  print("max abs err vs transformers:", errs)
  assert all(e <= 1e-5 for e in errs.values()), errs
  # Phrase ids use the shared table: rows beyond the word vocabulary were looked up.
  assert x["ids"].max() >= CFG.word_vocab_size


@nnx.jit
def _forward(model, x, given):
  """The whole pass, and each stack alone on torch's input to it (no error carried in)."""
  ntag = x["tag_ids"].shape[1]
  text = model.encode_text(x["ids"], x["a_mask"])
  vis = model.encode_vision(x["tag_ids"], x["t_mask"], x["regions"], x["r_mask"])
  joint = model.fuse(text, x["a_mask"], model.region_slots(vis, ntag), x["r_mask"], phrase=True)
  out = dict(text=text, vision=vis, joint=joint.sequence, pooled=joint.pooled)
  out["mid"] = joint.phrase_state
  for name in ("txt", "vis", "mul"):
    stack = getattr(model, f"{name}_encoder")
    out[f"{name}_out"] = stack(given[f"{name}_in"], given[f"{name}_mask"])
  return out
