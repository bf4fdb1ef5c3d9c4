"""Synthetic MVPTR pre-training data from the shapes world (`synthetic.py`), written in the
Oscar/VinVL layout (`mvptr_oscar_write.LayoutWriter`), so the demo and the tests read it through
the production reader.

Per image of the world (`ShapesWorld.scene` / `record`, image kind):
- regions: one per shape, the detector feature being a FIXED random projection (seed
  `PROJECTION_SEED`, 2048-d) of what the region shows -- one-hot shape, colour and size --
  plus small Gaussian noise, followed by the 6 box values of its exact box;
- tags (detector classes): the shape names;
- captions: the world's two captions;
- phrases per caption: the tuples the caption states, known exactly from the scene: relations
  (subject shape, relation, object shape) with relation one of `RELATIONS`, objects (shape,),
  attributes (shape, colour) and (shape, size), in that order. Single-word objects take the
  BERT word id of the shape name; attribute and relation tuples get ids from 30522 on
  (`phrase_vocab`).

Phrase-grounding ground truth: `grounding.json` next to the corpus (per corpus line, the
region row each sg phrase denotes, -1 if ambiguous), read with `grounding_targets`.

`write_splits` writes a train split and a held-out split (retrieval evaluation: its images and
their captions) from disjoint worlds (`synthetic.TRAIN_SEED` / `HELDOUT_SEED`); held-out image
ids start at `HELDOUT_ID_BASE` so image ids never collide across splits.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from data_pipelines import features as F
from data_pipelines import mvptr_regions
from data_pipelines import synthetic as S
from data_pipelines.mvptr_grounding_file import write_grounding
from data_pipelines.mvptr_oscar import OscarSource, load_tokenizer
from data_pipelines.mvptr_oscar_write import LayoutWriter
from data_pipelines.mvptr_phrases import PhraseTable

DATASET = "shapes"
FEATURE_DIM = 2048
PROJECTION_SEED = 20220128  # fixed: every split and run sees the same projection
NOISE_STD = 0.05
RELATIONS = {
  "to the left of": "left",
  "to the right of": "right",
  "above": "above",
  "below": "below",
}
HELDOUT_ID_BASE = 1_000_000
FIRST_PHRASE_ID = 30522  # bert-base-uncased word vocabulary size


def _description(shape: S.Shape) -> np.ndarray:
  """One-hot shape, colour, size: float64 [4 + 5 + 2]."""
  d = np.zeros(len(S.SHAPES) + len(S.COLOURS) + len(S.SIZES))
  d[S.SHAPES.index(shape.shape)] = 1
  d[len(S.SHAPES) + list(S.COLOURS).index(shape.colour)] = 1
  d[len(S.SHAPES) + len(S.COLOURS) + list(S.SIZES).index(shape.size)] = 1
  return d


@functools.lru_cache(maxsize=1)
def projection() -> np.ndarray:
  """float64 [11, FEATURE_DIM]: the fixed random projection of the region descriptions."""
  n = len(S.SHAPES) + len(S.COLOURS) + len(S.SIZES)
  out = np.random.default_rng(PROJECTION_SEED).standard_normal((n, FEATURE_DIM))
  out.flags.writeable = False
  return out


def region_vectors(shapes, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """float32 [n, FEATURE_DIM + 6]: projected descriptions + noise, then the box values."""
  desc = np.stack([_description(s) for s in shapes])  # [n, 11]
  feats = desc @ projection() + rng.normal(0, NOISE_STD, (len(shapes), FEATURE_DIM))
  boxes = [[x, y, x + w, y + h] for x, y, w, h in (s.bb for s in shapes)]
  return mvptr_regions.region_vectors(feats, boxes, image_size, image_size)


def phrase_vocab(tokenizer) -> PhraseTable:
  """Every tuple the world can state: objects -> word ids, attributes and relations -> ids from
  FIRST_PHRASE_ID in a fixed order."""
  table = {}
  for shape in S.SHAPES:
    ids = tokenizer.pieces(shape)[0]
    if len(ids) != 1:
      raise ValueError(f"shape name {shape!r} is {len(ids)} word pieces, expected one")
    table[(shape,)] = int(ids[0])
  tuples = [(s, a) for s in S.SHAPES for a in (*S.COLOURS, *S.SIZES)]
  tuples += [(a, r, b) for a in S.SHAPES for r in RELATIONS.values() for b in S.SHAPES]
  table.update({t: FIRST_PHRASE_ID + k for k, t in enumerate(tuples)})
  return PhraseTable(table)


def grounded_phrases(caption: str, shapes) -> list[tuple[tuple[str, ...], int]]:
  """(tuple, region) of each tuple a world caption states: the relation it names, then its
  objects, then their attributes (this order keeps the most specific tuples when `max_phrases`
  cuts the list). region = the index of the shape (= region row) the tuple denotes in this
  caption (a relation: its subject), -1 when it denotes several ((circle,) in a caption naming
  two circles)."""
  rels, objs, attrs = [], [], []
  for a in shapes:
    for b in shapes:
      if a is not b and f"{a.phrase()} {S.relation(a, b)} {b.phrase()}" == caption:
        rels.append(((a.shape, RELATIONS[S.relation(a, b)], b.shape), shapes.index(a)))
  for k, s in enumerate(shapes):
    if s.phrase() in caption:  # 'a large red circle'
      objs.append(((s.shape,), k))
      attrs += [((s.shape, s.colour), k), ((s.shape, s.size), k)]
    elif s.phrase(with_size=False) in caption:  # 'a red circle at the top left'
      objs.append(((s.shape,), k))
      attrs.append(((s.shape, s.colour), k))
  regions: dict[tuple, set[int]] = {}
  for t, k in rels + objs + attrs:
    regions.setdefault(t, set()).add(k)
  return [(t, min(ks) if len(ks) == 1 else -1) for t, ks in regions.items()]


def caption_phrases(caption: str, shapes) -> list[tuple[str, ...]]:
  """The tuples a world caption states, in `grounded_phrases` order."""
  return [t for t, _ in grounded_phrases(caption, shapes)]


def write(root: str, n_images: int, seed: int, first_id: int, tokenizer) -> str:
  """Images 0..n-1 of the world with `seed` as one layout under `root`; returns the spec path."""
  world = S.ShapesWorld(seed=seed)
  writer = LayoutWriter(root, DATASET, phrase_vocab(tokenizer))
  size, grounding = world.cfg.image_size, []
  for i in range(n_images):
    _, shapes = world.scene(i, F.IMAGE)
    rng = np.random.default_rng([PROJECTION_SEED, seed, i])
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (s.bb for s in shapes)]
    image_id = str(first_id + i)
    writer.add_image(
      image_id, region_vectors(shapes, size, rng), [s.shape for s in shapes], boxes, size, size
    )
    for caption in world.record(F.IMAGE, i)["captions"]:
      grounded = grounded_phrases(caption, shapes)
      writer.add_caption(image_id, caption, [t for t, _ in grounded])
      grounding.append([k for _, k in grounded])  # every tuple is in the vocabulary
  spec = writer.close()
  write_grounding(root, grounding)
  return spec


def write_splits(out_dir: str, n_train: int, n_heldout: int, tokenizer=None) -> dict[str, str]:
  """{'train': spec path, 'heldout': spec path} under out_dir/train and out_dir/heldout."""
  tok = load_tokenizer(tokenizer)
  return {
    "train": write(os.path.join(out_dir, "train"), n_train, S.TRAIN_SEED, 0, tok),
    "heldout": write(
      os.path.join(out_dir, "heldout"), n_heldout, S.HELDOUT_SEED, HELDOUT_ID_BASE, tok
    ),
  }


def main(argv: list[str] | None = None) -> int:
  """`python -m data_pipelines.mvptr_synthetic OUT_DIR [--train N] [--heldout N]`: writes both
  splits; stdout is a JSON summary (spec paths, records, phrase vocabulary size)."""
  import argparse

  parser = argparse.ArgumentParser(prog="python -m data_pipelines.mvptr_synthetic")
  parser.add_argument("out_dir")
  parser.add_argument("--train", type=int, default=400, help="train images (2 captions each)")
  parser.add_argument("--heldout", type=int, default=100, help="held-out images")
  parser.add_argument("--tokenizer", help="HF tokenizer dir (default: MiniLM, bert-base-uncased)")
  args = parser.parse_args(argv)
  tok = load_tokenizer(args.tokenizer)
  specs = write_splits(args.out_dir, args.train, args.heldout, tok)
  summary = {k: {"spec": p, "records": len(OscarSource(p, tok))} for k, p in specs.items()}
  summary["vocab_size"] = max(phrase_vocab(tok).ids) + 1
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
