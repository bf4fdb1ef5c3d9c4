"""Shared pieces of the MVPTR data tests: one tokenizer per process and small synthetic
Oscar-layout data sets."""

from __future__ import annotations

import functools

from data_pipelines import mvptr_synthetic
from data_pipelines.mvptr_examples import MvptrExampleSpec
from data_pipelines.mvptr_oscar import load_tokenizer

# Small lengths; the vocabulary holds the synthetic phrase ids (30522 + 92 tuples).
SPEC = MvptrExampleSpec(max_tokens=24, max_phrases=6, max_tags=8, max_regions=5, vocab_size=30614)


@functools.lru_cache(maxsize=1)
def tokenizer():
  """The MiniLM (bert-base-uncased vocabulary) tokenizer; loading takes seconds, so once."""
  return load_tokenizer(None)


def write_synthetic(out_dir, n_train: int = 24, n_heldout: int = 6) -> dict[str, str]:
  """{'train', 'heldout'} spec paths of a synthetic layout under out_dir."""
  return mvptr_synthetic.write_splits(str(out_dir), n_train, n_heldout, tokenizer())
