"""MVPTR stage 1 of the tiny model on the synthetic shapes world, on the CPU (tests, demo).

  python -m data_pipelines.mvptr_synthetic ...  (or `mvptr_synthetic.write_splits`)
  python train.py --config=configs/mvptr/tiny_stage1.py:spec=DIR/train/SPEC --workdir=RUNS/s1

The tiny MVPTR (three 3-layer stacks of width 40) with the real word vocabulary (the synthetic
captions are MiniLM = bert-base-uncased word pieces), the world's 92 attribute and relation
phrases after it, and the 2054-d synthetic region vectors; random initialisation. Global batch 8,
lengths cut to what the world's captions need. Stage 2: configs/mvptr/tiny_stage2.py.
"""

from configs.mvptr import common as mc
from data_pipelines import synthetic as S

WORD_VOCAB = 30522  # bert-base-uncased (the MiniLM tokenizer of the synthetic captions)
# The world's phrase ids after the words: (shape, colour | size) pairs, then (shape, relation,
# shape) triples (data_pipelines/mvptr_synthetic.py `phrase_vocab`).
PHRASES = len(S.SHAPES) * (len(S.COLOURS) + len(S.SIZES)) + len(S.SHAPES) ** 2 * 4


def tiny(stage: int, spec: str):
  c = mc.stage_config(stage, variant="tiny")
  c.model.dtype = "float32"
  c.model.mvptr.update(
    {"word_vocab_size": WORD_VOCAB, "vocab_size": WORD_VOCAB + PHRASES, "region_dim": 2054}
  )
  # MvptrConfig.tiny's stacks, listed so that a command line can change them (the tests run one
  # layer per stack: compile time).
  c.model.mvptr.update({"depth": 3, "phrase_layer": 1, "dropout": 0.1})
  c.data.tokenizer = "minilm"
  c.data.mvptr.spec = spec
  c.data.mvptr.update({"max_tokens": 20, "max_phrases": 6, "max_tags": 6, "max_regions": 4})
  c.batch.image = 8
  c.optim.lr = 1e-3
  c.optim.clip_norm = 1.0
  c.train.total_steps = 30
  c.train.log_every = 5
  c.train.ckpt_every = 10
  c.train.keep = 2
  c.train.keep_every = 0
  c.train.max_consecutive_nonfinite = 3
  c.train.export_at_end = False
  return c


def get_config(arg=None):
  return tiny(1, mc.parse(arg, ("spec",))["spec"])
