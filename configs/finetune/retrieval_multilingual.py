"""Multilingual image-text retrieval with the XLM-R model (docs/multilingual.md#configs).

  get_config('multi30k') | get_config('multi30k,large') | get_config('coco') | ...('coco,large')

The released code fine-tunes `XVLMPlusForRetrieval` from `cclm_x2vlm_{base,large}.th` with
`XRetrieval.py`: the training files of every language are read as one set, every language's
test file is evaluated after each epoch and the run keeps the best *mean* r_mean over the
languages (here `eval/retrieval/mean/r_mean`; per language `eval/retrieval/<lang>/...`). Files
are dicts language -> path as the official `train_file` / `test_file` (CCLM's
`Retrieval_multi30k_all_ft.yaml`, `Retrieval_coco_all_ft.yaml`). Settings of the CCLM analogue
(no X2-VLM multilingual config was released): 384 px, lr 3e-5, 10 epochs, warm-up 10 %, global
batch 128 (`--bs 128`), max_tokens 40, k_test 128 (Multi30K) / 256 (COCO). As in the English
retrieval configs, `XRetrieval.py` wraps the model in DDP before building the optimizer, so no
parameter gets lr_mult (docs/finetuning.md#lr_mult-quirk).

Training-set sizes are not in the configs: the schedule assumes Multi30K = 29,000 Flickr30K
training images with 5 captions in en and de and one in fr and cs (348,000 pairs), and
multilingual COCO = the English Karpathy count (566,747) for each of en, zh, ja; set
`train.total_steps` for other files.
Reported (Table 6, mean recall, base / large): Multi30K en 96.7 / 97.1, de 94.0 / 94.5,
fr 93.5 / 95.1, cs 92.9 / 94.9; COCO en 94.9 / 95.3, zh 93.0 / 93.3, ja 95.2 / 95.6.
"""

from __future__ import annotations

import ml_collections as mlc

from configs import common
from configs.finetune import common as ft

BATCH = 128
DATASETS = {
  "multi30k": dict(
    image_root="data/images/flickr30k",
    train={lang: f"data/finetune/multi30k/train.{lang}.json" for lang in ("en", "de", "fr", "cs")},
    test={
      lang: f"data/finetune/multi30k/test_2016_flickr.{lang}.json"
      for lang in ("en", "de", "fr", "cs")
    },
    k_test=128,
    train_pairs=2 * 29_000 * 5 + 2 * 29_000,
  ),
  "coco": dict(
    image_root="data/images/coco",
    train={lang: f"data/finetune/mscoco/{lang}.train.json" for lang in ("en", "zh", "ja")},
    test={
      "en": "data/finetune/mscoco/en.1k_test.json",
      "zh": "data/finetune/mscoco/zh.test.json",
      "ja": "data/finetune/mscoco/ja.1k_test.json",
    },
    k_test=256,
    train_pairs=3 * 566_747,
  ),
}


def language_sources(files: dict[str, str], image_root: str) -> dict[str, dict]:
  """{language: retrieval JSON path} -> {language: source entry}."""
  if not files:
    raise ValueError("no language files given")
  return {
    str(lang): common.source(path, type="json", image_root=image_root)
    for lang, path in files.items()
  }


def multilingual_retrieval(
  c: mlc.ConfigDict, train: dict[str, str], test: dict[str, str], image_root: str, k_test: int
) -> mlc.ConfigDict:
  """Per-language training files (read as one set) and per-language evaluation splits with
  their mean, the selection metric."""
  c.data.image = list(language_sources(train, image_root).values())
  c.eval.evaluators = ("retrieval",)
  c.eval.retrieval = mlc.ConfigDict(
    {
      "data": {lang: [src] for lang, src in language_sources(test, image_root).items()},
      "k_test": k_test,
      "itm_chunk": 256,
      "mean_name": "mean",
    }
  )
  c.train.select_metric = "eval/retrieval/mean/r_mean"
  return c


def get_config(arg=None):
  parts = (arg or "multi30k").split(",")
  name, size = parts[0], (parts[1] if len(parts) > 1 else "base")
  if name not in DATASETS or size not in ("base", "large") or len(parts) > 2:
    raise ValueError(f"expected 'multi30k|coco[,base|large]', got {arg!r}")
  d = DATASETS[name]
  c = ft.finetune_config("retrieval", f"xlmr_{size}", 384)
  c.data.max_tokens = 40
  c.data.mask_whole_word = False  # the official multilingual datasets (no effect on pieces)
  c.batch.image = BATCH
  c.optim.lr_mult = 1.0
  c.optim.lr = 3e-5
  ft.epochs(c, 10, ft.steps_per_epoch(d["train_pairs"], BATCH))
  return multilingual_retrieval(c, d["train"], d["test"], d["image_root"], d["k_test"])
