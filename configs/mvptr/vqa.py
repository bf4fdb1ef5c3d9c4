"""MVPTR VQA v2 fine-tuning at the official settings (`run_vqa.py` README command;
MVPTR_REFERENCE.md section 5): 32 questions per GPU x 8, lr 5e-5, 25 epochs (converges after
about 7), dropout 0.3 (ours is one rate, so also on attention probabilities), weight decay
0.05, lengths 128 tokens /
30 tags / 50 regions / 5 phrases, tags also appended to the question (`use_b_text` of the task
spec, default on for VQA), 3,129 answers, linear decay without warm-up, clipping 1.0; train+val
as training data. The VQA head starts from the MLM rows of each answer's word pieces of the
stage-2 checkpoint (the official `base_for_vqa`).

  python train.py --config=configs/mvptr/vqa.py:spec=DATA/vqa_trainval.json,pairs=N,\
val=DATA/vqa_val.json,stage2=RUNS/mvptr_stage2 --workdir=RUNS/mvptr_vqa

spec / val: task specs of the training and held-out questions (docs/mvptr.md#vqa-and-snli-ve-data);
pairs: the training questions (the epoch length); answers: the label file's size (default 3129).
"""

from configs.mvptr import common as mc
from configs.mvptr import finetune as ft


def get_config(arg=None):
  opts = mc.parse(arg, ("spec", "pairs", "val", "stage2"))
  lengths = {"max_tokens": 128, "max_tags": 30, "max_regions": 50, "max_phrases": 5}
  c = ft.task_config("mvptr_vqa", opts, 32, 25, lengths)
  c.model.mvptr.update({"qa_answers": int(opts.get("answers") or 3129), "dropout": 0.3})
  c.optim.lr = 5e-5
  return c
