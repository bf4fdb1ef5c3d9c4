"""MVPTR data in the Oscar/VinVL layout: the synthetic writer -> reader round trip equals what the
shapes world states (bit-exact regions, real word-piece ids), the files are the official ones,
bad lines are skipped and counted naming the record and field (reader, stream and validator
agree), and the converter from region JSON lines round-trips through the reader."""

import json
import os
import shutil

import numpy as np
import pytest
import yaml

from data_pipelines import features as F
from data_pipelines import mvptr_grounding_file, mvptr_stream, mvptr_synthetic
from data_pipelines import mvptr_oscar as MO
from data_pipelines import synthetic as S
from data_pipelines.tools import mvptr_convert, validate
from tests import mvptr_data_testlib as T

N_TRAIN = 10


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
  root = tmp_path_factory.mktemp("mvptr_oscar")
  return root, T.write_synthetic(root, n_train=N_TRAIN, n_heldout=4)


def _records(source):
  """[(record or None, SkipRecord or None)] of every index."""
  out = []
  for i in range(len(source)):
    try:
      out.append((source[i], None))
    except F.SkipRecord as e:
      out.append((None, e))
  return out


def test_synthetic_round_trip_equals_the_world(layout):
  _, specs = layout
  tok = T.tokenizer()
  source = MO.OscarSource(specs["train"], tok)
  assert len(source) == 2 * N_TRAIN and source.excluded == {} and source.dropped_phrases == 0
  world, vocab, k = S.ShapesWorld(seed=S.TRAIN_SEED), mvptr_synthetic.phrase_vocab(tok), 0
  relations = 0
  for i in range(N_TRAIN):
    _, shapes = world.scene(i, F.IMAGE)
    rng = np.random.default_rng([mvptr_synthetic.PROJECTION_SEED, S.TRAIN_SEED, i])
    regions = mvptr_synthetic.region_vectors(shapes, world.cfg.image_size, rng)
    tags = tok.pieces(" ".join(dict.fromkeys(s.shape for s in shapes)))[0]
    for caption in world.record(F.IMAGE, i)["captions"]:
      r, k = source[k], k + 1
      assert r["id"] == f"corpus.tsv:{k}"
      assert r["words"].dtype == np.int32 and r["words"].tolist() == tok.pieces(caption)[0]
      phrases = [vocab.tuple_to_id[t] for t in mvptr_synthetic.caption_phrases(caption, shapes)]
      assert r["phrases"].dtype == np.int32 and r["phrases"].tolist() == phrases
      relations += sum(p >= 30522 + 28 for p in phrases)  # relation ids follow the 28 attributes
      assert r["tags"].tolist() == tags
      assert r["regions"].dtype == np.float32 and np.array_equal(r["regions"], regions)
      assert r["image_id"].dtype == np.int64 and r["image_id"] == MO.image_key_id("shapes", str(i))
  assert relations > 0
  # Grounding ground truth: the region each phrase denotes shows that phrase's shape / colour
  # (descriptions recovered from the region features through the fixed projection).
  targets = mvptr_grounding_file.grounding_targets(source, 12)
  id_to_tuple = {v: t for t, v in vocab.tuple_to_id.items()}
  proj, checked = mvptr_synthetic.projection(), 0
  for i in range(len(source)):
    r = source[i]
    desc = np.linalg.lstsq(proj.T, r["regions"][:, :2048].T.astype(np.float64), rcond=None)[0]
    for p, k in zip(r["phrases"].tolist(), targets[i]):
      if k >= 0:
        words = id_to_tuple[p]
        assert S.SHAPES[int(np.argmax(desc[:4, k]))] == words[0]
        if len(words) == 2 and words[1] in S.COLOURS:
          assert list(S.COLOURS)[int(np.argmax(desc[4:9, k]))] == words[1]
        checked += 1
  assert checked > len(source)
  assert (targets[:, 0] >= 0).any()
  heldout = MO.OscarSource(specs["heldout"], tok)
  assert len(heldout) == 8
  assert not {int(r["image_id"]) for r, _ in _records(heldout)} & {
    int(r["image_id"]) for r, _ in _records(source)
  }


def test_tokenizer_gives_real_word_pieces(layout):
  tok = T.tokenizer()
  ids = tok.pieces("a large red circle above a small blue square")[0]
  assert len(ids) == 9 and 100 not in ids  # [UNK] = 100
  assert tok.decode(ids) == "a large red circle above a small blue square"
  record = MO.OscarSource(layout[1]["train"], tok)[0]
  assert 100 not in record["words"].tolist() + record["tags"].tolist()
  shapes = S.ShapesWorld(seed=S.TRAIN_SEED).scene(0, F.IMAGE)[1]
  assert tok.decode(record["tags"]) == " ".join(dict.fromkeys(s.shape for s in shapes))


def test_files_are_the_official_layout(layout):
  root, specs = layout
  spec = yaml.safe_load(open(specs["train"]))  # the official loader reads the spec as YAML
  assert spec["corpus"] == "shapes" and spec["image_feature_path"] == {"shapes": "features/shapes"}
  train = root / "train"
  for tsv in ("corpus.tsv", "features/shapes/features.tsv", "labels/shapes/predictions_gt.tsv"):
    data = (train / tsv).read_bytes()
    offsets = [int(x) for x in (train / tsv).with_suffix(".lineidx").read_text().split()]
    assert offsets[0] == 0 and all(data[o - 1 : o] == b"\n" for o in offsets[1:])
    assert len(offsets) == data.count(b"\n")
  rows = (train / "features/shapes/features.tsv").read_text().splitlines()
  index = json.loads((train / "features/shapes/imageid2idx.json").read_text())
  assert all(rows[r].split("\t")[0] == k for k, r in index.items())
  assert len(json.loads((train / "sg.json").read_text())) == 2 * N_TRAIN


def test_tsv_rows_count_blank_lines_and_catch_a_stale_lineidx(tmp_path):
  tsv = tmp_path / "x.tsv"
  tsv.write_bytes(b"a\tb\n\nccc\r\nd")  # rows: 'a\tb', blank, 'ccc', 'd' (no final newline)
  rows = MO.TsvRows(str(tsv))
  assert [rows.row(r) for r in range(len(rows))] == [b"a\tb", None, b"ccc", b"d"]
  (tmp_path / "x.lineidx").write_text("0\n4\n5\n10\n")  # the official offsets: used
  assert MO.TsvRows(str(tsv)).row(3) == b"d"
  (tmp_path / "x.lineidx").write_text("0\n3\n6\n")  # stale: offsets not after a newline
  assert [MO.TsvRows(str(tsv)).row(r) for r in range(4)] == [b"a\tb", None, b"ccc", b"d"]


def test_caption_phrases_state_what_the_caption_says():
  a = S.Shape("circle", "red", "large", (2, 20, 19, 19))
  b = S.Shape("square", "blue", "small", (40, 25, 10, 10))
  relation = "a large red circle to the left of a small blue square"
  assert mvptr_synthetic.caption_phrases(relation, [b, a]) == [
    ("circle", "left", "square"),
    ("square",),
    ("circle",),
    ("square", "blue"),
    ("square", "small"),
    ("circle", "red"),
    ("circle", "large"),
  ]
  assert mvptr_synthetic.caption_phrases("a red circle at the top left", [a]) == [
    ("circle",),
    ("circle", "red"),
  ]


def test_chunked_features_and_dataset_selection(layout):
  root, _ = layout
  d = root / "chunked"
  shutil.copytree(root / "train", d)
  (d / "features/shapes/7").mkdir()
  for name in ("features.tsv", "imageid2idx.json", "features.lineidx"):
    os.rename(d / "features/shapes" / name, d / "features/shapes/7" / name)
  corpus = (d / "corpus.tsv").read_text().splitlines()
  corpus = [line.replace("shapes_", "shapes_7_", 1) for line in corpus]  # "<ds>_<chunk>_<id>"
  (d / "corpus.tsv").write_text("\n".join(corpus) + "\n")
  chunked = MO.OscarSource(d / "oscar.yaml", T.tokenizer())
  plain = MO.OscarSource(root / "train/oscar.yaml", T.tokenizer())
  assert len(chunked) == len(plain)
  for i in (0, 5, len(plain) - 1):
    assert np.array_equal(chunked[i]["regions"], plain[i]["regions"])
    assert chunked[i]["image_id"] == plain[i]["image_id"]
  spec = MO.read_spec_file(d / "oscar.yaml")
  spec["image_feature_path"]["coco"] = "features/shapes"
  spec["image_label_path"]["coco"] = "labels/shapes"
  only_coco = MO.OscarSource({**spec, "corpus": "coco"}, T.tokenizer(), root=str(d))
  assert len(only_coco) == 0 and only_coco.excluded == {"other_dataset": len(plain)}
  assert len(MO.OscarSource({**spec, "corpus": "shapes_coco"}, T.tokenizer(), root=str(d))) == 20
  spec["image_feature_path"]["vg"] = spec["image_label_path"]["vg"] = "nowhere"
  with pytest.raises(FileNotFoundError, match="nowhere"):
    MO.OscarSource({**spec, "corpus": "vg"}, T.tokenizer(), root=str(d))


def _corrupt(root):
  """A copy of the train layout with one fault per image (see the expected table below)."""
  d = root / "corrupt"
  shutil.copytree(root / "train", d)
  feats = (d / "features/shapes/features.tsv").read_text().splitlines()
  feats[1] = feats[1][:-8] + "%%%%%%%%"  # image 1: features not base64
  (d / "features/shapes/features.tsv").write_text("\n".join(feats) + "\n")
  index = json.loads((d / "features/shapes/imageid2idx.json").read_text())
  del index["2"]  # image 2: not in the feature TSV's map
  (d / "features/shapes/imageid2idx.json").write_text(json.dumps(index))
  sg = json.loads((d / "sg.json").read_text())
  sg[6][0] = [999999]  # line 7: an id outside the vocabulary
  sg[8][0] = [["circle"], ["circle", "sparkly"]]  # line 9: a known and an unknown tuple
  labels = (d / "labels/shapes/predictions_gt.tsv").read_text().splitlines()
  labels[5] = labels[5][:-5]  # image 5: label JSON cut
  (d / "labels/shapes/predictions_gt.tsv").write_text("\n".join(labels) + "\n")
  corpus = (d / "corpus.tsv").read_text().splitlines()
  corpus[12] = "shapes_6\tshapes_6\t  "  # line 13: empty caption
  corpus.append("shapes_0\tshapes_qa_0\twhat is red?")  # a QA line: not a record
  sg.append([[], {}, "shapes_qa_0"])
  (d / "corpus.tsv").write_text("\n".join(corpus) + "\n")
  (d / "sg.json").write_text(json.dumps(sg))
  return d / "oscar.yaml"


EXPECTED = {
  3: ("corrupt_image", "features"),
  4: ("corrupt_image", "features"),
  5: ("missing_image", "image_feature"),
  6: ("missing_image", "image_feature"),
  7: ("bad_field_type", "sg_file[6].phrases[0]"),
  11: ("bad_json", "image_label"),
  12: ("bad_json", "image_label"),
  13: ("empty_caption", "caption"),
}


def test_bad_lines_are_skipped_counted_and_named(layout, capsys):
  root, _ = layout
  spec = _corrupt(root)
  source = MO.OscarSource(spec, T.tokenizer())
  assert len(source) == 2 * N_TRAIN and source.excluded == {"qa": 1}
  assert source.dropped_phrases == 1  # ("circle", "sparkly") is not in the vocabulary
  got = {}
  for i, (record, err) in enumerate(_records(source)):
    if err is not None:
      assert err.record_id == f"corpus.tsv:{i + 1}"
      got[i + 1] = (err.reason, err.field)
    elif i + 1 == 9:
      assert record["phrases"].tolist() == T.tokenizer().pieces("circle")[0]
  assert got == EXPECTED
  counts = {}
  for reason, _ in EXPECTED.values():
    counts[reason] = counts.get(reason, 0) + 1
  it = mvptr_stream.pretrain_iterator(source, T.SPEC, 2, 0, 0, 1, num_epochs=1)
  assert sum(len(b["image_id"]) for b in it) == 2 * N_TRAIN - len(EXPECTED)
  assert it.skip_counts() == counts
  capsys.readouterr()
  assert validate.main([str(spec)]) == validate.EXIT_BAD_RECORDS
  out = capsys.readouterr().out
  assert "corpus.tsv:7: bad_field_type: sg_file[6].phrases[0]" in out
  assert f"{2 * N_TRAIN} records, {len(EXPECTED)} bad" in out
  assert validate.main([str(layout[1]["train"]), "--quiet"]) == validate.EXIT_OK
  os.remove(root / "corrupt/sg.json")
  assert validate.main([str(spec)]) == validate.EXIT_UNREADABLE


def test_region_jsonl_converter_round_trip(tmp_path, capsys):
  world = S.ShapesWorld(seed=5)
  src = S.write_jsonl(world, F.REGION, 5, tmp_path / "jsonl", n_files=1)[0]
  feats, rng = tmp_path / "feats", np.random.default_rng(0)
  feats.mkdir()
  records = [world.record(F.REGION, i) for i in range(5)]
  values = [rng.standard_normal((len(r["elems"]), 7)).astype(np.float32) for r in records]
  for r, v in zip(records, values):
    np.save(feats / f"{r['id']}.npy", v)
  os.remove(feats / f"{records[1]['id']}.npy")  # missing features
  np.save(feats / f"{records[3]['id']}.npy", values[3][:1])  # one row for several elems
  capsys.readouterr()
  assert mvptr_convert.main([src, str(feats), str(tmp_path / "out")]) == 0
  out, err = capsys.readouterr()
  summary = json.loads(out)  # stdout is the JSON summary only
  assert summary["images"] == 3 and summary["skipped"] == {"missing_image": 1, "corrupt_image": 1}
  assert f"{os.path.basename(src)}:2: missing_image: features" in err
  source = MO.OscarSource(summary["spec"], T.tokenizer())
  assert len(source) == summary["captions"] == 3  # one whole-image caption per record
  tok = T.tokenizer()
  for k, (i, (record, e)) in enumerate(zip([0, 2, 4], _records(source))):
    assert e is None
    want, shapes = records[i], world.scene(i, F.REGION)[1]
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (el["bb"] for el in want["elems"])]
    size = world.cfg.image_size
    expected = MO.mvptr_regions.region_vectors(values[i], boxes, size, size)
    assert np.array_equal(record["regions"], expected)  # every elem box is inside the image
    names = " ".join(dict.fromkeys(s.shape for s in shapes))
    assert record["tags"].tolist() == tok.pieces(names)[0]
    assert record["words"].tolist() == tok.pieces(want["captions"][0])[0]
    assert record["image_id"] == MO.image_key_id("regions", str(k))
    id_to_tuple = {v: t for t, v in source.vocab.tuple_to_id.items()}
    stated = {(s.shape,) for s in shapes} | {(s.shape, s.size) for s in shapes}
    stated |= {(s.shape, s.colour) for s in shapes}  # the listing caption names every shape
    assert {id_to_tuple[p] for p in record["phrases"].tolist()} == stated
  ids = json.loads((tmp_path / "out/image_ids.json").read_text())
  assert ids == {"0": records[0]["id"], "1": records[2]["id"], "2": records[4]["id"]}
  # Grounding targets: a phrase naming exactly one elem -> that elem's region row, else -1.
  targets = mvptr_grounding_file.grounding_targets(source, 12)
  id_to_tuple = {v: t for t, v in source.vocab.tuple_to_id.items()}
  grounded = 0
  for k, (i, (record, _)) in enumerate(zip([0, 2, 4], _records(source))):
    names = [el["captions"][0] for el in records[i]["elems"]]
    for slot, pid in enumerate(record["phrases"].tolist()):
      name = id_to_tuple[pid][0]
      want = names.index(name) if names.count(name) == 1 else -1
      assert targets[k, slot] == want, (k, slot, name, names)
      grounded += want >= 0
    assert (targets[k, len(record["phrases"]) :] == -1).all()
  assert grounded == summary["grounded_phrases"] > 0
  assert validate.main([summary["spec"], "--quiet"]) == validate.EXIT_OK
