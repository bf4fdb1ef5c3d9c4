"""The shapes world's captions in six languages, and a multilingual retrieval set on disk.

Templated translations of the world's vocabulary (colours, shapes, sizes, "and", "a picture
of"), so an image's caption in any language names the same shapes: English, German, French,
Czech (the Multi30K languages), Chinese and Japanese (the multilingual COCO ones; non-Latin
scripts without spaces between words). The templates are simple on purpose (German and Czech
adjectives are not declined by gender): what matters is that every language has its own words
for the same pixels, so a multilingual model must learn each language to retrieve in it.

`write_multilingual_retrieval` writes the Multi30K layout: one set of images shared by all
languages and, per language, the official retrieval JSON arrays (train: one entry per caption
with its image_id; val / test: one entry per image with its captions), returned as dicts
language -> path like the official `train_file` / `test_file` (docs/multilingual.md#data).
`caption_corpus` lists the sentences a SentencePiece model for these captions is trained on.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines.synthetic import (
  COLOURS,
  SHAPES,
  SIZES,
  TRAIN_SEED,
  Shape,
  ShapesWorld,
  WorldConfig,
)
from data_pipelines.synthetic_tasks import _scenes, _write_bytes, _write_json, split_seed


@dataclasses.dataclass(frozen=True)
class Lexicon:
  """One language: word tables and templates ({size} {colour} {shape} order, article)."""

  colour: Mapping[str, str]
  shape: Mapping[str, str]
  size: Mapping[str, str]
  sized: str  # phrase with size, e.g. "a {size} {colour} {shape}"
  plain: str  # phrase without size
  comma: str  # between list items but the last two
  conj: str  # between the last two items
  picture: str  # "a picture of {x}"


LEXICONS: dict[str, Lexicon] = {
  "en": Lexicon(
    dict(red="red", green="green", blue="blue", yellow="yellow", purple="purple"),
    dict(circle="circle", square="square", triangle="triangle", diamond="diamond"),
    dict(small="small", large="large"),
    "a {size} {colour} {shape}",
    "a {colour} {shape}",
    ", ",
    " and ",
    "a picture of {x}",
  ),
  "de": Lexicon(
    dict(red="roter", green="grüner", blue="blauer", yellow="gelber", purple="violetter"),
    dict(circle="Kreis", square="Quadrat", triangle="Dreieck", diamond="Rhombus"),
    dict(small="kleiner", large="großer"),
    "ein {size} {colour} {shape}",
    "ein {colour} {shape}",
    ", ",
    " und ",
    "ein Bild mit {x}",
  ),
  "fr": Lexicon(
    dict(red="rouge", green="vert", blue="bleu", yellow="jaune", purple="violet"),
    dict(circle="cercle", square="carré", triangle="triangle", diamond="losange"),
    dict(small="petit", large="grand"),
    "un {size} {shape} {colour}",
    "un {shape} {colour}",
    ", ",
    " et ",
    "une image de {x}",
  ),
  "cs": Lexicon(
    dict(red="červený", green="zelený", blue="modrý", yellow="žlutý", purple="fialový"),
    dict(circle="kruh", square="čtverec", triangle="trojúhelník", diamond="kosočtverec"),
    dict(small="malý", large="velký"),
    "{size} {colour} {shape}",
    "{colour} {shape}",
    ", ",
    " a ",
    "obrázek, na kterém je {x}",
  ),
  "zh": Lexicon(
    dict(red="红色", green="绿色", blue="蓝色", yellow="黄色", purple="紫色"),
    dict(circle="圆形", square="正方形", triangle="三角形", diamond="菱形"),
    dict(small="小的", large="大的"),
    "一个{size}{colour}{shape}",
    "一个{colour}{shape}",
    "、",
    "和",
    "一张有{x}的图片",
  ),
  "ja": Lexicon(
    dict(red="赤い", green="緑の", blue="青い", yellow="黄色い", purple="紫の"),
    dict(circle="円", square="正方形", triangle="三角形", diamond="ひし形"),
    dict(small="小さい", large="大きい"),
    "{size}{colour}{shape}",
    "{colour}{shape}",
    "、",
    "と",
    "{x}の画像",
  ),
}
LANGUAGES = tuple(LEXICONS)
NON_LATIN = ("zh", "ja")


def phrase(lang: str, s: Shape, with_size: bool = True) -> str:
  lex = LEXICONS[lang]
  words = dict(colour=lex.colour[s.colour], shape=lex.shape[s.shape], size=lex.size[s.size])
  return (lex.sized if with_size else lex.plain).format(**words)


def _join(lang: str, items: Sequence[str]) -> str:
  lex = LEXICONS[lang]
  if len(items) == 1:
    return items[0]
  return lex.comma.join(items[:-1]) + lex.conj + items[-1]


def captions(lang: str, shapes: Sequence[Shape], rng: np.random.Generator, n: int) -> list[str]:
  """n true captions of a scene in `lang`, each naming every shape: the listing first, then
  the other phrasings (picture-of, without sizes) in a random order, cycled."""
  if lang not in LEXICONS:
    raise ValueError(f"unknown language {lang!r}; expected one of {LANGUAGES}")
  listing = _join(lang, [phrase(lang, s) for s in shapes])
  pool = [
    listing,
    LEXICONS[lang].picture.format(x=listing),
    _join(lang, [phrase(lang, s, with_size=False) for s in shapes]),
  ]
  order = rng.permutation(len(pool) - 1) + 1
  out = pool[:1] + [pool[i] for i in order]
  return [out[i % len(out)] for i in range(n)]


def caption_corpus(languages: Sequence[str] = LANGUAGES, max_shapes: int = 2) -> list[str]:
  """Every caption of scenes with up to `max_shapes` shapes (all templates), per language: the
  text a SentencePiece model for these captions is trained on."""
  singles = [
    Shape(shape, colour, size, (0, 0, 1, 1))
    for shape, colour, size in itertools.product(SHAPES, COLOURS, SIZES)
  ]
  out = []
  for lang in languages:
    for k in range(1, max_shapes + 1):
      for combo in itertools.product(singles, repeat=k):
        out += captions(lang, combo, np.random.default_rng(0), 3)
  return list(dict.fromkeys(out))  # distinct, in order


@dataclasses.dataclass(frozen=True)
class MultilingualFiles:
  """A multilingual retrieval set: shared images, per-language files (language -> path)."""

  image_root: str
  train: dict[str, str]
  val: dict[str, str]
  test: dict[str, str]


def write_multilingual_retrieval(
  out_dir: str | os.PathLike,
  languages: Sequence[str] = LANGUAGES,
  n_train: int = 32,
  n_val: int = 8,
  n_test: int = 8,
  captions_per_image: int = 2,
  eval_captions: int = 2,
  image_size: int = 64,
  seed: int = TRAIN_SEED,
  world: Mapping[str, Any] | None = None,
) -> MultilingualFiles:
  """Writes images/<split>/NNNNNN.png and <split>.<lang>.json (Multi30K names) under out_dir."""
  out_dir = os.fspath(out_dir)
  bad = [lang for lang in languages if lang not in LEXICONS]
  if bad:
    raise ValueError(f"unknown languages {bad}; expected some of {LANGUAGES}")
  root, seen = os.path.join(out_dir, "images"), set()
  files: dict[str, dict[str, str]] = {}
  for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
    cfg = WorldConfig(**{**dict(world or {}), "image_size": image_size})
    world_split = ShapesWorld(cfg, seed=split_seed(seed, split))
    entries: dict[str, list] = {lang: [] for lang in languages}
    for k, (index, data, shapes) in enumerate(_scenes(world_split, n, seen)):
      rel = f"{split}/{k:06d}.png"
      _write_bytes(os.path.join(root, rel), data)
      for j, lang in enumerate(languages):
        rng = np.random.default_rng([world_split.seed, 13, index, j])
        if split == "train":
          caps = captions(lang, shapes, rng, captions_per_image)
          entries[lang] += [{"image": rel, "caption": c, "image_id": k} for c in caps]
        else:
          entries[lang].append(
            {"image": rel, "caption": captions(lang, shapes, rng, eval_captions)}
          )
    files[split] = {
      lang: _write_json(os.path.join(out_dir, f"{split}.{lang}.json"), entries[lang])
      for lang in languages
    }
  return MultilingualFiles(root, files["train"], files["val"], files["test"])
