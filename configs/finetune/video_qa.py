"""Video question answering as classification over the training answer vocabulary: MSRVTT-QA
(1,500 answers) and MSVD-QA (1,000), docs/finetuning.md#video-qa.

Known (paper): MSRVTT-QA 5 frames at 320 px, MSVD-QA 8 frames at 224 px; the official model: the
clip's frames averaged with the frame embedding (extended from the checkpoint's 3 rows, the new
rows fresh), the question fused with the clip, a new `cls_head` build_mlp(D, answers) on the
fused [CLS]; cross-entropy ignoring questions whose answer is outside the vocabulary (always
wrong at test); questions cleaned to `max_tokens` words; frames flipped per frame unless the
question or answer says left / right; lr_mult 2 active (the official script builds the
optimizer before DDP). Not released, reconstructed: global batch 128, lr 3e-5, 5 epochs,
warm-up 10 %, 40 tokens. Training questions: MSRVTT-QA 158,581, MSVD-QA 30,933. The official
script keeps the best test accuracy; we select on val.
Reported (test accuracy): MSRVTT-QA base 45.0, large 45.5; MSVD-QA base 52.8, large 54.6.

  get_config('msrvtt') | get_config('msvd') | get_config('msrvtt,large') | ...
"""

import ml_collections as mlc

from configs import common
from configs.finetune import common as ft

SETS = {  # name -> (frames, resolution, answers, training questions, frame-file naming)
  "msrvtt": (5, 320, 1500, 158_581, "msrvtt"),
  "msvd": (8, 224, 1000, 30_933, "msvd"),
}
BATCH = 128


def get_config(arg=None):
  opts = common.parse_arg(arg or "msrvtt")
  name = next((k for k in opts if k in SETS), "msrvtt")
  variant = "large" if "large" in opts else "base"
  frames, res, answers, questions, naming = SETS[name]
  c = ft.finetune_config("video_qa", variant, res)
  d = f"data/finetune/{name}_qa"
  entry = lambda split: common.source(
    f"{d}/{split}.jsonl",
    type="video_qa",
    ans2label=f"{d}/train_ans2label.json",
    frames_root=f"data/videos/{name}",
    naming=naming,
  )
  c.model.frame_len = frames
  c.batch.frame_len = frames
  c.model.cls_labels = answers
  c.data.video = [entry("train")]
  c.data.max_tokens = 40
  c.batch.video = BATCH
  c.optim.lr = 3e-5
  ft.epochs(c, 5, ft.steps_per_epoch(questions, BATCH))
  c.eval.evaluators = ("video_qa",)
  c.eval.video_qa = mlc.ConfigDict({"data": {"val": [entry("val")], "test": [entry("test")]}})
  c.train.select_metric = "eval/video_qa/val/acc"
  return c
