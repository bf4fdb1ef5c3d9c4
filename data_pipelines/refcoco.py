"""RefCOCO-style grounding files -> canonical region records (grain `RandomAccessDataSource`).

The official grounding fine-tuning reads three things (docs/data.md#refcoco-grounding):

  * a split file, one JSON array of {"image": path under image_root, "text": referring
    expression, "ref_id": int}, one entry per expression (the test file mixes testA and testB);
  * the REFER refs pickle `refs(unc).p`: a list of {ref_id, ann_id, image_id, split, sentences};
    `split` is one of train / val / testA / testB (test for the umd splits);
  * the COCO-style `instances.json`, whose `annotations` give each ann_id its `bbox`
    [x, y, w, h] in pixels of the original image.

Each entry becomes one region record: the image bytes, no whole-image caption, and one elem
{bb: the ref's box, captions: [text], attributes: []}. Record ids are "ref<ref_id>:<k>", k the
0-based index of the expression among the file's entries of that ref. The optional `split`
filter keeps the entries whose ref is in that split (entries whose ref cannot be resolved are
kept, so that they are counted). Bad entries raise `SkipRecord` when read (missing or unknown
ref_id, a box that is not 4 numbers, a missing image, an empty text); a box outside the image
is skipped as 'bad_box' by the shared checks (`checks.check_texts`), like every region record.
Without refs / instances an entry's own "bbox" is used (the form some released train files
have); the split filter then needs refs.

`refs(unc).p` is a pickle: only open files you trust.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

from data_pipelines import features as F

SPLITS = ("train", "val", "testA", "testB", "test")


class _Item(NamedTuple):
  """One entry, resolved at load time: what to read, or why it is bad."""

  index: int  # 1-based position in the split file
  rid: str
  image: str
  text: str
  bb: tuple[float, float, float, float] | None
  problem: tuple[str, str, str] | None  # (reason, field, detail)


def _load_refs(path: str) -> dict[Any, dict]:
  """ref_id -> {'ann_id', 'split'} from a REFER refs pickle."""
  with open(path, "rb") as f:
    refs = pickle.load(f)
  if not isinstance(refs, list):
    raise ValueError(f"{path}: expected a pickled list of refs, got {type(refs).__name__}")
  out = {}
  for r in refs:
    if not isinstance(r, dict) or "ref_id" not in r or "ann_id" not in r:
      raise ValueError(f"{path}: a ref without ref_id / ann_id: {r!r:.80}")
    out[r["ref_id"]] = {"ann_id": r["ann_id"], "split": r.get("split")}
  return out


def _load_boxes(path: str) -> dict[Any, Any]:
  """ann_id -> bbox from a COCO-style instances.json."""
  with open(path, "rb") as f:
    inst = json.load(f)
  anns = inst.get("annotations") if isinstance(inst, dict) else None
  if not isinstance(anns, list):
    raise ValueError(f"{path}: expected a COCO instances object with an 'annotations' list")
  return {a["id"]: a.get("bbox") for a in anns if isinstance(a, dict) and "id" in a}


def _number_box(bb: Any) -> tuple[float, float, float, float] | None:
  ok = (
    isinstance(bb, list)
    and len(bb) == 4
    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bb)
  )
  return tuple(float(v) for v in bb) if ok else None


class RefcocoSource:
  """Region records of a RefCOCO-style split file (see the module docstring).

  Args:
    path: the split JSON array (e.g. refcoco+_train.json).
    refs: REFER refs pickle (refs(unc).p); instances: COCO instances.json. Both or neither.
    image_root: base directory of the entries' image paths (default: the split file's dir).
    split: keep only entries whose ref is in this split (str or list of str, from SPLITS).
    image_key / text_key / ref_key: entry key names.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    refs: str | os.PathLike | None = None,
    instances: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    split: str | Sequence[str] | None = None,
    image_key: str = "image",
    text_key: str = "text",
    ref_key: str = "ref_id",
  ):
    self.path = os.fspath(path)
    if (refs is None) != (instances is None):
      raise ValueError("refcoco source: give both 'refs' and 'instances', or neither")
    splits = {split} if isinstance(split, str) else set(split or ())
    if splits - set(SPLITS):
      raise ValueError(f"refcoco source: unknown split(s) {sorted(splits - set(SPLITS))}")
    if splits and refs is None:
      raise ValueError("refcoco source: a split filter needs 'refs' (splits live there)")
    self.image_root = os.fspath(image_root) if image_root else os.path.dirname(self.path)
    self.keys = (image_key, text_key, ref_key)
    with open(self.path, "rb") as f:
      entries = json.load(f)
    if not isinstance(entries, list):
      raise ValueError(f"{self.path}: expected a JSON array of entries")
    ref_table = _load_refs(os.fspath(refs)) if refs is not None else None
    boxes = _load_boxes(os.fspath(instances)) if instances is not None else None
    seen: Counter = Counter()
    self._items: list[_Item] = []
    for j, entry in enumerate(entries):
      item, ref_split = self._resolve(j + 1, entry, ref_table, boxes, seen)
      if not splits or ref_split is None or ref_split in splits:
        self._items.append(item)

  def _resolve(self, index, entry, ref_table, boxes, seen) -> tuple[_Item, str | None]:
    """(_Item, the ref's split or None) of one entry of the split file."""
    image_key, text_key, ref_key = self.keys
    rid = f"{os.path.basename(self.path)}:{index}"

    def bad(field, detail, reason="bad_field_type"):
      return _Item(index, rid, "", "", None, (reason, field, detail)), None

    if not isinstance(entry, dict):
      return bad("<entry>", f"a JSON {type(entry).__name__}, not an object", "bad_json")
    ref_id = entry.get(ref_key)
    if not isinstance(ref_id, (int, str)) or isinstance(ref_id, bool):
      return bad(ref_key, "missing" if ref_id is None else f"expected an int, got {ref_id!r:.40}")
    rid = f"ref{ref_id}:{seen[ref_id]}"
    seen[ref_id] += 1
    if ref_table is None:
      bb, ref_split, box_field = entry.get("bbox"), None, "bbox"
    else:
      if ref_id not in ref_table:
        return bad(ref_key, f"no ref {ref_id!r} in the refs file")
      ann_id, ref_split = ref_table[ref_id]["ann_id"], ref_table[ref_id]["split"]
      if ann_id not in boxes:
        return bad("ann_id", f"annotation {ann_id!r} of ref {ref_id!r} not in instances")
      bb, box_field = boxes[ann_id], f"annotations[{ann_id}].bbox"
    box = _number_box(bb)
    image, text = entry.get(image_key), entry.get(text_key)
    problem = None
    if box is None:
      problem = ("bad_field_type", box_field, f"expected 4 numbers [x, y, w, h], got {bb!r:.60}")
    elif not isinstance(image, str) or not image:
      problem = ("bad_field_type", image_key, f"expected an image path, got {image!r:.40}")
    elif not isinstance(text, str):
      problem = ("bad_field_type", text_key, f"expected a str, got {type(text).__name__}")
    elif not text.strip():
      problem = ("empty_caption", text_key, f"expression {text!r} is empty")
    item = _Item(index, rid, image or "", text or "", box, problem)
    return item, ref_split

  def __len__(self) -> int:
    return len(self._items)

  def __repr__(self) -> str:
    return f"RefcocoSource(path={self.path!r}, records={len(self)})"

  def location(self, i: int) -> tuple[str, int]:
    """(split file, 1-based entry index) of record i."""
    return self.path, self._items[i].index

  def __getitem__(self, i: int) -> dict:
    """Canonical region record i; raises `SkipRecord` for a bad entry (never anything else)."""
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} out of range for {len(self)} records")
    item = self._items[i]
    if item.problem is not None:
      raise F.SkipRecord(item.problem[0], item.rid, item.problem[1], item.problem[2])
    path = os.path.join(self.image_root, item.image)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise F.SkipRecord("missing_image", item.rid, self.keys[0], f"{path}: {e}") from None
    if not data:
      raise F.SkipRecord("corrupt_image", item.rid, self.keys[0], f"{path} is empty")
    return {
      "kind": F.REGION,
      "id": item.rid,
      "image": data,
      "captions": [],
      "elems": [{"bb": list(item.bb), "captions": [item.text], "attributes": []}],
    }

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [self[i] for i in indices]
