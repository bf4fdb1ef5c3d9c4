"""MVPTR pre-training data in the Oscar/VinVL on-disk layout, as a grain random-access source.

The layout is the one the official pre-training reader takes
(`oscar/oscar_datasets_ml/oscar_tsv4.py`, MVPTR_REFERENCE.md sections 1 and 4), described by a
dataset spec (the official yaml; JSON is valid YAML, so `.json` and `.yaml` files both load):

  corpus_file          TSV, one caption per line: image key, label key, caption. Keys are
                       "<dataset>_<image id>" ("<dataset>_..._<chunk>_<image id>" for chunked
                       feature sets); "cc" means "googlecc". Label keys containing "qa" are QA
                       lines (not read, as the official `--only_cap`).
  corpus               dataset names joined by "_" (default: every key of image_feature_path)
  image_feature_path   {dataset: dir}; dir/features.tsv + dir/imageid2idx.json, or chunked:
                       dir/<chunk>/features.tsv + imageid2idx.json. Rows: image id, num_boxes,
                       base64 float32 [num_boxes x img_feature_dim] (`mvptr_regions`).
  image_label_path     {dataset: dir}; dir/predictions_gt.tsv (image id, JSON {"objects":
                       [{"class": ...}], "image_h", "image_w", optional "gt_objects"}) +
                       dir/imageid2idx.json. Tags = the de-duplicated classes (of "gt_objects"
                       when present and `use_gtlabels`), in first-seen order.
  sg_file              JSON list aligned with the corpus lines: [phrases, {word index: [phrase
                       index]}, label key]; phrases are ids, or tuples of words (lists, or
                       "_"-joined strings as the fine-tuning files) mapped through the phrase
                       vocabulary, a tuple not in it dropped (as the official reader does).
  id2phrase_file       optional {"<id>": [words]} (`id2phrase_new.json`): single-word objects
                       carry their BERT word id, tuples ids >= 30522. Ids in the sg file must be
                       in it when it is given.
  img_feature_dim      2054 (2048 + 6 box values); use_gtlabels: true.

Relative paths are under the spec file's directory (the official root); `data_dir` replaces
that base for the feature paths (the official `--data_dir`). Row indices of imageid2idx.json
count every line of its TSV; the byte offsets come from the official `.lineidx` next to the
TSV when it fits the file, else from our cached newline scan (`sources.line_index`).

A record is {words, phrases, tags: int32 word-piece / phrase ids, regions: float32
[n, img_feature_dim], image_id: int64 (`image_key_id`), id: "<corpus file>:<line>"}. A bad
line raises `features.SkipRecord` naming the record and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping

import numpy as np

from data_pipelines import features as F
from data_pipelines import fileio, mvptr_regions, sources
from data_pipelines.mvptr_phrases import DATASET_ALIASES, PhraseTable, load_sg_file

FEATURE_FILE, LABEL_FILE, OFFSET_MAP = "features.tsv", "predictions_gt.tsv", "imageid2idx.json"


@dataclasses.dataclass(frozen=True)
class OscarSpec:
  """A dataset spec with every path resolved."""

  corpus_file: str
  datasets: tuple[str, ...]
  image_feature_path: Mapping[str, str]
  image_label_path: Mapping[str, str]
  sg_file: str
  id2phrase_file: str | None = None
  img_feature_dim: int = mvptr_regions.BOX_VALUES + 2048
  use_gtlabels: bool = True


def read_spec_file(path: str | os.PathLike) -> dict:
  """The dict of a spec file (JSON, or YAML through PyYAML when it is not JSON)."""
  with open(path) as f:
    text = f.read()
  try:
    spec = json.loads(text)
  except ValueError:
    import yaml  # only for real YAML specs (the official ones)

    try:
      spec = yaml.safe_load(text)
    except yaml.YAMLError as e:
      raise ValueError(f"{path}: neither JSON nor YAML: {e}") from None
  if not isinstance(spec, dict):
    raise ValueError(f"{path}: holds a {type(spec).__name__}, not a mapping of spec keys")
  return spec


def load_spec(spec, root: str | None = None, data_dir: str | None = None) -> OscarSpec:
  """OscarSpec of a spec file path or dict (`root`: base of relative paths of a dict)."""
  if not isinstance(spec, Mapping):
    root = os.path.dirname(os.path.abspath(spec))
    spec = read_spec_file(spec)
  root = root or "."
  for key in ("corpus_file", "image_feature_path", "image_label_path", "sg_file"):
    if key not in spec:
      raise ValueError(f"dataset spec has no {key!r} (keys: {sorted(spec)})")

  def under(base, p):
    return p if os.path.isabs(p) else os.path.join(base, p)

  feats, labels = dict(spec["image_feature_path"]), dict(spec["image_label_path"])
  names = tuple(spec["corpus"].split("_")) if spec.get("corpus") else tuple(feats)
  for name in names:
    for what, paths in (("image_feature_path", feats), ("image_label_path", labels)):
      if name not in paths:
        raise ValueError(f"dataset {name!r} of 'corpus' has no entry in {what!r}")
  vocab = spec.get("id2phrase_file")
  return OscarSpec(
    corpus_file=under(root, spec["corpus_file"]),
    datasets=names,
    image_feature_path={n: under(data_dir or root, feats[n]) for n in names},
    image_label_path={n: under(root, labels[n]) for n in names},
    sg_file=under(root, spec["sg_file"]),
    id2phrase_file=under(root, vocab) if vocab else None,
    img_feature_dim=int(spec.get("img_feature_dim", 2054)),
    use_gtlabels=bool(spec.get("use_gtlabels", True)),
  )


def image_key_id(dataset: str, image_id: str) -> int:
  """int64 id of an image: 63 bits of blake2b("<dataset>_<image id>"), the same for every
  caption of the image and (with overwhelming probability) different across images."""
  digest = hashlib.blake2b(f"{dataset}_{image_id}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def split_key(key: str) -> tuple[str, str, str | None]:
  """(dataset, image id, chunk or None) of a corpus key ("<ds>_..._<chunk>_<id>")."""
  parts = key.split("_")
  chunk = parts[-2] if len(parts) >= 3 else None
  return DATASET_ALIASES.get(parts[0], parts[0]), parts[-1], chunk


class TsvRows:
  """Row access to a TSV file: row r (0-based, every line counted, as the official TSVFile
  does) -> its bytes. The row offsets come from the official `<name>.lineidx` when it exists
  and passes a spot check (huge VinVL feature files ship one), else from our cached newline
  scan (`sources.line_index`)."""

  def __init__(self, path: str, cache_dir: str | None = None):
    self.path = path
    size = fileio.stat_key(path)[1]
    starts = _official_lineidx(path, size)
    if starts is None:
      offsets, numbers = sources.line_index(path, cache_dir)
      n = int(numbers[-1]) if len(numbers) else 0
      starts = np.full(n, -1, np.int64)  # -1: a blank row
      starts[numbers - 1] = offsets
    # ends[r]: where row r's bytes stop at the latest (the next non-blank row, or the file end).
    nxt = np.where(starts < 0, size, starts)
    nxt = np.minimum.accumulate(nxt[::-1])[::-1]
    self.starts = starts  # [rows]
    self.ends = np.append(nxt[1:], size).astype(np.int64)  # [rows]

  def __len__(self) -> int:
    return len(self.starts)

  def row(self, r: int) -> bytes | None:
    """The bytes of row r without its newline; None for a blank row or r out of range."""
    if not 0 <= r < len(self) or self.starts[r] < 0:
      return None
    with fileio.open_binary(self.path) as f:
      f.seek(int(self.starts[r]))
      data = f.read(int(self.ends[r] - self.starts[r]))
    return data.split(b"\n", 1)[0].rstrip(b"\r")


def _official_lineidx(path: str, size: int, checks: int = 16) -> np.ndarray | None:
  """Row starts from `<path minus extension>.lineidx` (one decimal byte offset per line), or
  None when there is none or it does not fit the file (offsets not increasing, past the end,
  or a sampled offset not right after a newline: a stale index)."""
  idx = os.path.splitext(path)[0] + ".lineidx"
  if fileio.is_url(path) or not os.path.isfile(idx):
    return None
  with open(idx, "rb") as f:
    try:
      starts = np.array(f.read().split(), dtype=np.int64)
    except ValueError:
      return None
  if len(starts) == 0 or starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= size:
    return None
  with open(path, "rb") as f:
    for k in np.linspace(1, len(starts) - 1, min(checks, len(starts) - 1)).astype(int):
      f.seek(int(starts[k]) - 1)
      if f.read(1) != b"\n":
        return None
  return starts


class KeyedTsv:
  """A TSV with its imageid2idx.json: image id -> row text (features and labels alike)."""

  def __init__(self, directory: str, name: str, cache_dir: str | None = None):
    path, index = os.path.join(directory, name), os.path.join(directory, OFFSET_MAP)
    for p in (path, index):
      if not os.path.isfile(p):
        raise FileNotFoundError(f"{p} does not exist")
    with open(index) as f:
      self.index = {str(k): int(v) for k, v in json.load(f).items()}
    self.rows = TsvRows(path, cache_dir)

  def get(self, image_id: str) -> str | None:
    r = self.index.get(image_id)
    data = None if r is None else self.rows.row(r)
    return None if data is None else data.decode("utf-8", errors="replace")


def _feature_stores(directory: str, cache_dir: str | None) -> dict[str | None, KeyedTsv]:
  """{None: one feature TSV} or {chunk: TSV} of the chunk subdirectories."""
  if os.path.isfile(os.path.join(directory, FEATURE_FILE)):
    return {None: KeyedTsv(directory, FEATURE_FILE, cache_dir)}
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"feature directory {directory} does not exist")
  chunks = sorted(
    c for c in os.listdir(directory) if os.path.isfile(os.path.join(directory, c, FEATURE_FILE))
  )
  if not chunks:
    raise FileNotFoundError(f"{directory} has no {FEATURE_FILE}, nor chunk dirs holding one")
  return {c: KeyedTsv(os.path.join(directory, c), FEATURE_FILE, cache_dir) for c in chunks}


def load_tokenizer(tokenizer):
  """Our `text_ops.Tokenizer` (anything with `.pieces(text)`), loaded from a directory or the
  MiniLM package (bert-base-uncased vocabulary) when None."""
  if tokenizer is not None and hasattr(tokenizer, "pieces"):
    return tokenizer
  from data_pipelines.assets import minilm_dir
  from data_pipelines.text_ops import Tokenizer

  return Tokenizer(tokenizer or minilm_dir(), max_tokens=3)


class OscarSource:
  """grain `RandomAccessDataSource` of MVPTR pre-training records (module docstring).

  Args:
    spec: spec file path, dict (relative paths under `root`) or OscarSpec.
    tokenizer: a `text_ops.Tokenizer`, a tokenizer directory, or None (MiniLM's vocabulary).
    index_cache_dir: optional directory for the on-disk line-offset indices.
  Attributes: `excluded` {reason: corpus lines not indexed}: QA lines, datasets outside
  'corpus'; `dropped_phrases`: sg tuples not in the phrase vocabulary (dropped, as official).
  """

  def __init__(self, spec, tokenizer=None, index_cache_dir=None, root=None, data_dir=None):
    self.spec = spec if isinstance(spec, OscarSpec) else load_spec(spec, root, data_dir)
    s = self.spec
    self.tokenizer = load_tokenizer(tokenizer)
    self.corpus = TsvRows(s.corpus_file, index_cache_dir)
    self.vocab = PhraseTable.load(s.id2phrase_file) if s.id2phrase_file else None
    self.sg = load_sg_file(s.sg_file, self.vocab)
    if len(self.sg) != len(self.corpus):
      raise ValueError(f"{s.sg_file}: {len(self.sg)} entries for {len(self.corpus)} corpus lines")
    self.features = {
      n: _feature_stores(p, index_cache_dir) for n, p in s.image_feature_path.items()
    }
    self.labels = {
      n: KeyedTsv(p, LABEL_FILE, index_cache_dir) for n, p in s.image_label_path.items()
    }
    keep, self.excluded = [], {}
    for r in range(len(self.corpus)):
      why = self.sg.exclusion(r, s.datasets)
      if why:
        self.excluded[why] = self.excluded.get(why, 0) + 1
      else:
        keep.append(r)
    self.rows = np.asarray(keep, np.int64)  # [N] corpus rows of the records
    self.dropped_phrases = self.sg.dropped

  def __len__(self) -> int:
    return len(self.rows)

  def __repr__(self) -> str:
    return f"OscarSource({self.spec.corpus_file!r}, records={len(self)})"

  def location(self, i: int) -> tuple[str, int]:
    """(corpus file, 1-based line number) of record i."""
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} out of range for {len(self)} records")
    return self.spec.corpus_file, int(self.rows[i]) + 1

  def __getitem__(self, i: int) -> dict:
    """Record i; raises `SkipRecord` for a bad line (never anything else)."""
    path, line = self.location(i)
    rid = f"{os.path.basename(path)}:{line}"
    raw = self.corpus.row(line - 1)
    cols = (raw or b"").decode("utf-8", errors="replace").split("\t")
    if len(cols) < 3:
      raise F.SkipRecord("bad_field_type", rid, "corpus", f"{len(cols)} columns, need 3")
    image_key, label_key, caption = cols[0], cols[1], cols[2]
    phrases = self.sg.phrases(line - 1, label_key, rid)
    dataset, image_id, chunk = split_key(image_key)
    if split_key(label_key)[:2] != (dataset, image_id):
      raise F.SkipRecord("bad_field_type", rid, "label_key", f"{label_key!r} vs {image_key!r}")
    if not caption.strip():
      raise F.SkipRecord("empty_caption", rid, "caption", "empty text")
    words = self.tokenizer.pieces(caption)[0]
    if not words:
      raise F.SkipRecord("caption_no_tokens", rid, "caption", f"{caption[:60]!r}")
    tags = self._tags(dataset, image_id, rid)
    regions = self._regions(dataset, image_id, chunk, rid)
    return dict(
      words=np.asarray(words, np.int32),
      phrases=phrases,
      tags=np.asarray(self.tokenizer.pieces("\t".join(tags))[0] if tags else [], np.int32),
      regions=regions,
      image_id=np.int64(image_key_id(dataset, image_id)),
      id=rid,
    )

  def _tags(self, dataset: str, image_id: str, rid: str) -> list[str]:
    text = self.labels[dataset].get(image_id)
    if text is None:
      raise F.SkipRecord("missing_image", rid, "image_label", f"{dataset} image {image_id}")
    cols = text.split("\t")
    try:
      info = json.loads(cols[1]) if len(cols) >= 2 else None
    except ValueError:
      info = None
    if not isinstance(info, dict) or cols[0] != image_id:
      raise F.SkipRecord("bad_json", rid, "image_label", f"label row of {dataset} {image_id}")
    objects = info.get("gt_objects") if self.spec.use_gtlabels else None
    objects = objects if objects is not None else info.get("objects")
    if not isinstance(objects, list) or not all(
      isinstance(o, dict) and isinstance(o.get("class"), str) for o in objects
    ):
      raise F.SkipRecord("bad_field_type", rid, "image_label.objects", "need [{'class': str}]")
    return list(dict.fromkeys(o["class"] for o in objects))  # de-duplicated, first-seen order

  def _regions(self, dataset: str, image_id: str, chunk: str | None, rid: str) -> np.ndarray:
    stores = self.features[dataset]
    store = stores.get(None) or stores.get(chunk)
    line = store.get(image_id) if store is not None else None
    if line is None:
      raise F.SkipRecord("missing_image", rid, "image_feature", f"{dataset} image {image_id}")
    got, vectors = mvptr_regions.decode_feature_row(line, self.spec.img_feature_dim, rid)
    if got != image_id:
      raise F.SkipRecord(
        "bad_field_type", rid, "image_feature", f"row of {got!r}, not {image_id!r}"
      )
    return vectors

  def __getitems__(self, indices) -> list[dict]:
    return [self[i] for i in indices]
