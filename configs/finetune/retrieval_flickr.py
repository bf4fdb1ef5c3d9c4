"""Image-text retrieval on Flickr30K (Karpathy split, 1K test images) at the paper's settings.

As `retrieval_coco.py` (batch 1024, 384 px, lr 3e-5, 10 epochs, reconstructed where the paper is
silent) with k = 32 re-ranked candidates. Training set: 29,000 images, 145,000 captions.
Reported (base 4M): TR R@1/5/10 97.4 / 99.9 / 100, IR 90.0 / 98.6 / 99.3.

  get_config('base') | get_config('large')
"""

from configs.finetune import retrieval_coco


def get_config(arg=None):
  return retrieval_coco.retrieval_config(arg or "base", "flickr30k", 145_000, k_test=32)
