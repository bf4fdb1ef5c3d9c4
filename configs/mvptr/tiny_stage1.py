"""MVPTR stage 1 of the tiny model on the synthetic shapes world, on the CPU (tests, demo).

  python -m data_pipelines.mvptr_synthetic ...  (or `mvptr_synthetic.write_splits`)
  python train.py --config=configs/mvptr/tiny_stage1.py:spec=DIR/train/SPEC --workdir=RUNS/s1

The tiny MVPTR (three 2-layer stacks of width 128, 4 heads, MLP 512) with the real word
vocabulary (the synthetic captions are MiniLM = bert-base-uncased word pieces), the world's 92
attribute and relation phrases after it, and the 2054-d synthetic region vectors; random
initialisation. Global batch 8, lengths cut to what the world's captions need; 40 steps of stage
1, 400 of stage 2 (configs/mvptr/tiny_stage2.py). Why width 128: at width 40 the ITM loss stayed
at ln 2 with the paper's hard negatives for 800 steps; at 128 it falls from about step 200, with
the other five (docs/mvptr.md#training).
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
  # Two layers per stack (the phrase layer is the first cross-modal layer), no dropout: a few
  # hundred CPU steps from a random init.
  c.model.mvptr.update({"width": 128, "num_heads": 4, "mlp_dim": 512})
  c.model.mvptr.update({"depth": 2, "phrase_layer": 0, "dropout": 0.0})
  c.data.tokenizer = "minilm"
  c.data.mvptr.spec = spec
  c.data.mvptr.update({"max_tokens": 20, "max_phrases": 6, "max_tags": 6, "max_regions": 4})
  # From a random init the [CLS] features of every row start out alike, so the VSC and ITM
  # gradients are tiny next to those of the masked-concept terms over 30,522 words: weighted 10
  # here (the paper's configs keep every weight at 1).
  c.loss.mvptr.weights.vsc = 10.0
  if stage == 2:
    c.loss.mvptr.weights.itm = 10.0
  c.batch.image = 8
  c.optim.lr = 1e-3
  c.optim.clip_norm = 1.0
  c.train.total_steps = 40 if stage == 1 else 400
  c.train.log_every = 10
  c.train.ckpt_every = 50
  c.train.keep = 2
  c.train.keep_every = 0
  c.train.max_consecutive_nonfinite = 3
  c.train.export_at_end = False
  c.train.fast_compile = True  # XLA's cheap CPU options: compile in seconds
  return c


def get_config(arg=None):
  return tiny(1, mc.parse(arg, ("spec",))["spec"])
