"""Synthetic MVPTR VQA and SNLI-VE data from the shapes world, written in the files of the
official `run_vqa.py` / `run_ve.py` (`mvptr_task_sources.py` reads them), so tests and demos go
through the production reader.

Per split directory (the images of one world seed, region features as `mvptr_synthetic`: a
fixed random projection of what each shape shows + its box values; tags = the shape names):

  features/features.tsv, imageid2idx.json (keys "shapes_<id>", normalised by the reader as the
            official keys), predictions.tsv ({"objects": [{"class", "rect"}], image size})
  vqa.json  task spec -> qla.json ({q, an, s, img_id, q_id, o}), sg_tuples.json ([phrase ids,
            info]), ans2label.pkl (every answer the world can give, the same file in each split)
  ve.json   task spec -> snli_ve.jsonl ({Flickr30K_ID, sentence2, gold_label, pairID}),
            sgs.json ([[words of a tuple], ...], pairID]), id2phrase.json

Questions the world answers exactly (`questions`): `synthetic_qa.scene_questions` (colour of a
unique shape, shape of a unique colour, position, total count, yes/no) and how many of a shape
type there are; soft score 1 for the answer. Hypotheses (`hypotheses`), one of each label per
image: "there is a <colour> <shape>" of a shape in the scene (entailment) or of a pair the scene
lacks (contradiction: the world is closed), and "the <colour> <shape> is <property>" of a shape
in the scene with a property the picture cannot show (neutral).
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np

from data_pipelines import features as F
from data_pipelines import mvptr_regions, mvptr_synthetic
from data_pipelines import synthetic as S
from data_pipelines.mvptr_oscar import load_tokenizer
from data_pipelines.synthetic_qa import scene_questions

WHERE = ("top left", "top", "top right", "left", "centre", "right")
WHERE += ("bottom left", "bottom", "bottom right")
ANSWERS = ("0", "1", "2", "3", "4", "yes", "no", *S.COLOURS, *S.SHAPES, *WHERE)
PROPERTIES = ("heavy", "new", "made of wood", "expensive")


def questions(shapes, image_size: int, rng) -> list[tuple[str, str]]:
  """(question, answer) pairs true of a scene (module docstring)."""
  qa = scene_questions(shapes, image_size, rng)
  for shape in S.SHAPES:
    qa.append((f"how many {shape}s are there?", str(sum(s.shape == shape for s in shapes))))
  return qa


def question_tuples(question: str, shapes) -> list[tuple[str, ...]]:
  """Scene-graph tuples a question names: each shape word (object), each colour + shape pair
  (attribute) -- what a parser of the question would give."""
  words = question.rstrip("?").replace("s are", " are").split()
  out = [(w,) for w in words if w in S.SHAPES]
  out += [(b, a) for a, b in zip(words, words[1:]) if a in S.COLOURS and b in S.SHAPES]
  return list(dict.fromkeys(out))


def hypotheses(shapes, rng) -> list[tuple[str, str, list[tuple[str, ...]]]]:
  """(hypothesis, gold label, tuples) of each label for a scene."""
  present = [(s.colour, s.shape) for s in shapes]
  absent = [(c, sh) for c in S.COLOURS for sh in S.SHAPES if (c, sh) not in present]
  c, sh = present[int(rng.integers(len(present)))]
  ac, ash = absent[int(rng.integers(len(absent)))]
  nc, nsh = present[int(rng.integers(len(present)))]
  prop = PROPERTIES[int(rng.integers(len(PROPERTIES)))]
  return [
    (f"there is a {c} {sh}", "entailment", [(sh,), (sh, c)]),
    (f"there is a {ac} {ash}", "contradiction", [(ash,), (ash, ac)]),
    (f"the {nc} {nsh} is {prop}", "neutral", [(nsh,), (nsh, nc)]),
  ]


def _write(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def _images(root: str, world: S.ShapesWorld, n: int, first_id: int):
  """Writes the feature directory; returns [(image id, shapes)]."""
  size, feats, labels, index, out = world.cfg.image_size, [], [], {}, []
  for i in range(n):
    _, shapes = world.scene(i, F.IMAGE)
    image_id = str(first_id + i)
    rng = np.random.default_rng([mvptr_synthetic.PROJECTION_SEED, world.seed, i])
    vectors = mvptr_synthetic.region_vectors(shapes, size, rng)
    index[f"shapes_{image_id}"] = i
    feats.append(mvptr_regions.encode_feature_row(image_id, vectors))
    objects = [
      {"class": s.shape, "rect": [x, y, x + w, y + h]} for s in shapes for x, y, w, h in [s.bb]
    ]
    info = {"objects": objects, "image_h": size, "image_w": size}
    labels.append(f"{image_id}\t{json.dumps(info)}")
    out.append((image_id, shapes))
  _write(os.path.join(root, "features", "features.tsv"), "".join(r + "\n" for r in feats))
  _write(os.path.join(root, "features", "imageid2idx.json"), json.dumps(index))
  _write(os.path.join(root, "features", "predictions.tsv"), "".join(r + "\n" for r in labels))
  return out


def _vqa(root: str, images, size: int, seed: int, vocab) -> str:
  qla, sg, label = [], [], {a: i for i, a in enumerate(ANSWERS)}
  for image_id, shapes in images:
    rng = np.random.default_rng([seed, 23, int(image_id)])
    for q, a in questions(shapes, size, rng):
      qid = len(qla)
      tags = ";".join(s.shape for s in shapes)
      qla.append(
        {"q": q, "an": [label[a]], "s": [1.0], "img_id": int(image_id), "q_id": qid, "o": tags}
      )
      ids = [vocab.tuple_to_id[t] for t in question_tuples(q, shapes)]
      sg.append([ids, f"vqa_{qid}"])
  _write(os.path.join(root, "qla.json"), json.dumps(qla))
  _write(os.path.join(root, "sg_tuples.json"), json.dumps(sg))
  with open(os.path.join(root, "ans2label.pkl"), "wb") as f:
    pickle.dump(label, f)
  spec = {"task": "vqa", "questions": "qla.json", "sg_file": "sg_tuples.json"}
  spec |= {"label_file": "ans2label.pkl", "img_feat_dir": "features", "use_b_text": True}
  _write(os.path.join(root, "vqa.json"), json.dumps(spec))
  return os.path.join(root, "vqa.json")


def _ve(root: str, images, seed: int, vocab) -> str:
  lines, sg = [], []
  for image_id, shapes in images:
    rng = np.random.default_rng([seed, 29, int(image_id)])
    for text, gold, tuples in hypotheses(shapes, rng):
      pair = f"{image_id}#{len(lines)}"
      lines.append(
        json.dumps(
          {"Flickr30K_ID": image_id, "sentence2": text, "gold_label": gold, "pairID": pair}
        )
      )
      sg.append([[list(t) for t in tuples], pair])
  _write(os.path.join(root, "snli_ve.jsonl"), "".join(r + "\n" for r in lines))
  _write(os.path.join(root, "sgs.json"), json.dumps(sg))
  _write(os.path.join(root, "id2phrase.json"), json.dumps(vocab.id2phrase()))
  spec = {"task": "ve", "pairs": "snli_ve.jsonl", "sg_file": "sgs.json"}
  spec |= {"id2phrase_file": "id2phrase.json", "img_feat_dir": "features", "use_b_text": False}
  _write(os.path.join(root, "ve.json"), json.dumps(spec))
  return os.path.join(root, "ve.json")


def write_splits(out_dir: str, n_train: int, n_heldout: int, tokenizer=None) -> dict:
  """{'vqa': {'train': spec, 'heldout': spec}, 've': {...}} under out_dir/<split>, from the
  disjoint train / held-out worlds (held-out image ids from `mvptr_synthetic.HELDOUT_ID_BASE`)."""
  vocab = mvptr_synthetic.phrase_vocab(load_tokenizer(tokenizer))
  out = {"vqa": {}, "ve": {}}
  for split, n, seed, first in (
    ("train", n_train, S.TRAIN_SEED, 0),
    ("heldout", n_heldout, S.HELDOUT_SEED, mvptr_synthetic.HELDOUT_ID_BASE),
  ):
    world, root = S.ShapesWorld(seed=seed), os.path.join(out_dir, split)
    images = _images(root, world, n, first)
    out["vqa"][split] = _vqa(root, images, world.cfg.image_size, seed, vocab)
    out["ve"][split] = _ve(root, images, seed, vocab)
  return out
