"""MVPTR retrieval fine-tuning on Flickr30K at the official settings (configs/mvptr/finetune.py):
64 pairs per GPU x 8 (the README command; the paper states 96), lr 4e-5, 10 epochs (paper 5),
the rest as COCO (configs/mvptr/retrieval_coco.py; same options).
"""

from configs.mvptr import common as mc
from configs.mvptr import finetune as ft


def get_config(arg=None):
  return ft.retrieval_config(mc.parse(arg, ("spec", "pairs", "val", "stage2")), 64, 10)
