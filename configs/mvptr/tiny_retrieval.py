"""MVPTR retrieval fine-tuning of the tiny model on the synthetic shapes world, on the CPU
(tests, `make mvptr-demo`), from the parameters of a tiny stage-2 run (configs/mvptr/tiny_stage2.py;
its pre-training heads are dropped, the retrieval `classifier` starts from its initializer).

  python train.py --config=configs/mvptr/tiny_retrieval.py:spec=DIR/train/SPEC,\
val=DIR/heldout/SPEC,stage2=RUNS/s2 --workdir=RUNS/ret

The tiny model and lengths of the pre-training configs, nothing masked; global batch 16, AdamW
lr 1e-3 (the tiny runs learn from near-random stacks), no dropout, linear decay without warm-up,
clipping 1.0 as the official fine-tuning; held-out retrieval (k_c 16, k_i 8) every 100 steps,
the best re-ranked r_mean kept.
"""

from configs.mvptr import common as mc
from configs.mvptr import finetune as ft
from configs.mvptr import tiny_stage1


def tiny_finetune(task: str, heads: str, opts: dict):
  """The tiny model and lengths of tiny_stage1 under the fine-tuning base, from `stage2`."""
  c = ft.finetune_config(task, heads, variant="tiny")
  pre = tiny_stage1.tiny(2, opts["spec"])
  c.model.dtype = "float32"
  c.model.mvptr.update({k: v for k, v in pre.model.mvptr.items() if k != "phrase_head"})
  c.data.tokenizer = pre.data.tokenizer
  c.data.mvptr = pre.data.mvptr
  c.init.checkpoint = opts["stage2"]
  c.batch.image = 16
  c.optim.lr = 1e-3
  for key in ("log_every", "keep", "keep_every", "max_consecutive_nonfinite", "fast_compile"):
    c.train[key] = pre.train[key]
  c.train.ckpt_every = 100
  c.train.export_at_end = False
  return c


def tiny_schedule(c, section, metric: str):
  """The tiny fine-tuning runs' schedule: 300 steps, the task's evaluator (`section`, its
  `eval.<task>` settings) on the held-out split every 100, the best `metric` kept."""
  c.train.total_steps = 300
  c.train.eval_every = 100
  c.eval.evaluators = (c.task,)
  c.eval.batch_size = 32
  c.eval[c.task] = section
  c.train.select_metric = f"eval/{c.task}/heldout/{metric}"
  return c


def get_config(arg=None):
  opts = mc.parse(arg, ("spec", "val", "stage2"))
  c = tiny_finetune("mvptr_retrieval", "retrieval", opts)
  return tiny_schedule(c, ft.retrieval_eval(opts["val"], k_c=16, k_i=8, split="heldout"), "r_mean")
