"""MVPTR stage 1 at the paper's settings (configs/mvptr/common.py): MCR^v + MCR^s + VSC on the
uni-modal stacks, 15 epochs, from BERT-base as the paper states.

  python train.py --config=configs/mvptr/stage1.py:spec=DATA/pretrain.yaml,pairs=N \
      --workdir=RUNS/mvptr_stage1

spec: the Oscar-layout dataset spec (docs/mvptr.md#data); pairs: its caption lines (the epoch
length). BERT from `data/bert-base-uncased` (`--config.init.bert_dir=...`), phrase rows from
`--config.init.phrase_words=phrase_words.json` ({phrase id: word-piece ids}).
"""

from configs.mvptr import common as mc


def get_config(arg=None):
  opts = mc.parse(arg, ("spec", "pairs"))
  c = mc.stage_config(1)
  c.data.mvptr.spec = opts["spec"]
  c.init.bert_dir = opts.get("bert", "data/bert-base-uncased")
  c.train.total_steps = mc.steps(1, int(opts["pairs"]))
  return c
