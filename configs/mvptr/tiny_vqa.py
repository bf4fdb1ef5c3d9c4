"""MVPTR VQA fine-tuning of the tiny model on the synthetic shapes world (CPU): questions the
world answers exactly (`data_pipelines/mvptr_synthetic_qa.py`, written in the official
`run_vqa.py` files), from a tiny stage-2 run as configs/mvptr/tiny_retrieval.py; the VQA head
starts from the MLM rows of each answer's word pieces; as many answers as the spec's label file.

  python train.py --config=configs/mvptr/tiny_vqa.py:spec=DIR/train/vqa.json,\
val=DIR/heldout/vqa.json,stage2=RUNS/s2 --workdir=RUNS/vqa

Held-out VQA score every 100 steps, the best kept.
"""

from configs.mvptr import common as mc
from configs.mvptr import finetune as ft
from configs.mvptr.tiny_retrieval import tiny_finetune, tiny_schedule


def get_config(arg=None):
  from data_pipelines import mvptr_task_sources as TS

  opts = mc.parse(arg, ("spec", "val", "stage2"))
  c = tiny_finetune("mvptr_vqa", "vqa", opts)
  answers = TS.read_answers(TS.read_task_spec(opts["spec"])["label_file"])
  c.model.mvptr.qa_answers = len(answers)
  return tiny_schedule(c, ft.task_eval(opts["val"], split="heldout"), "score")
