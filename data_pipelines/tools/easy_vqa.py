"""Converts the `easy-vqa` package's data set (real small VQA data: 64 x 64 images of one
coloured shape, 38,575 training / 9,673 test questions, 13 answers) into the official VQA file
format (docs/data.md#easy-vqa):

  python -m data_pipelines.tools.easy_vqa OUT [--val_images 200] [--max_train_images N]
      [--max_test_images N]

OUT/images/{train,test}/<id>.png (copies), OUT/vqa_{train,val,test}.json ({question_id, image,
question, answer}), OUT/answer_list.json. The package gives one answer per question; it is
written as ten agreeing annotators (answer = [a] x 10) so the official VQA accuracy scores an
exact answer 1. The last `--val_images` training images (with their questions) form the val
split; the package's test set is the test split. Question ids: training index, test index +
10,000,000.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

TEST_ID_OFFSET = 10_000_000


def _split(questions, keep, offset, split):
  texts, answers, image_ids = questions
  rows = []
  for i, (q, a, im) in enumerate(zip(texts, answers, image_ids)):
    if im in keep:
      rows.append(
        {"question_id": i + offset, "image": f"{split}/{im}.png", "question": q, "answer": [a] * 10}
      )
  return rows


def convert(out_dir, val_images: int = 200, max_train_images: int = 0, max_test_images: int = 0):
  """Writes the files (module docstring); returns {split: number of questions}."""
  import easy_vqa  # pylint: disable=g-import-not-at-top

  out = {}
  train_paths, test_paths = easy_vqa.get_train_image_paths(), easy_vqa.get_test_image_paths()
  train_ids = sorted(train_paths)[: max_train_images or None]
  test_ids = sorted(test_paths)[: max_test_images or None]
  val_ids = set(train_ids[len(train_ids) - val_images :]) if val_images else set()
  groups = {
    "train": (easy_vqa.get_train_questions(), set(train_ids) - val_ids, 0, "train", train_paths),
    "val": (easy_vqa.get_train_questions(), val_ids, 0, "train", train_paths),
    "test": (easy_vqa.get_test_questions(), set(test_ids), TEST_ID_OFFSET, "test", test_paths),
  }
  for name, (questions, keep, offset, folder, paths) in groups.items():
    os.makedirs(os.path.join(out_dir, "images", folder), exist_ok=True)
    for im in keep:
      shutil.copyfile(paths[im], os.path.join(out_dir, "images", folder, f"{im}.png"))
    rows = _split(questions, keep, offset, folder)
    with open(os.path.join(out_dir, f"vqa_{name}.json"), "w", encoding="utf-8") as f:
      json.dump(rows, f)
    out[name] = len(rows)
  with open(os.path.join(out_dir, "answer_list.json"), "w", encoding="utf-8") as f:
    json.dump(easy_vqa.get_answers(), f)
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("out_dir")
  p.add_argument("--val_images", type=int, default=200)
  p.add_argument("--max_train_images", type=int, default=0)
  p.add_argument("--max_test_images", type=int, default=0)
  a = p.parse_args(argv)
  counts = convert(a.out_dir, a.val_images, a.max_train_images, a.max_test_images)
  print(json.dumps(counts))


if __name__ == "__main__":
  main()
