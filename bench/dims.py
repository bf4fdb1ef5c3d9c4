"""A model given by its dimensions (`--dims` of bench/train_step.py and bench/eval.py).

  width=64,heads=4,mlp=256,layers=2+2+2,vocab=1024,embed=32

Keys: width, heads, mlp (every tower; the fusion tower always has the text width), layers
(vision+text+fusion, or one depth for all), vocab, embed (the ITC projection), patch, and per
tower vision_width, vision_heads, vision_mlp, text_width, text_heads, text_mlp, fusion_heads,
fusion_mlp. Keys not given keep the variant's values.
"""

from __future__ import annotations

import dataclasses

OFFICIAL_TINY = "width=64,heads=4,mlp=256,layers=2+2+2,vocab=1024,embed=32"


def parse(dims: str) -> dict[str, str]:
  out = {}
  for part in filter(None, (p.strip() for p in dims.split(","))):
    name, sep, value = part.partition("=")
    if not sep or not value:
      raise SystemExit(f"--dims {dims!r}: {part!r} is not key=value")
    out[name] = value
  return out


def with_dims(cfg, dims: str):
  """`cfg` with the sizes of a `--dims` string (keys in the module docstring)."""
  if not dims:
    return cfg
  d = parse(dims)
  towers = {"vision": {}, "text": {}, "fusion": {}}
  for key, field in (("width", "width"), ("heads", "num_heads"), ("mlp", "mlp_dim")):
    for tower in towers:
      value = d.pop(f"{tower}_{key}", d.get(key))
      if value is not None and not (tower == "fusion" and key == "width"):
        towers[tower][field] = int(value)
  for key in ("width", "heads", "mlp"):
    d.pop(key, None)
  if "layers" in d:
    depths = [int(x) for x in d.pop("layers").split("+")]
    depths = depths * 3 if len(depths) == 1 else depths
    if len(depths) != 3:
      raise SystemExit(f"--dims layers={dims}: give one depth or vision+text+fusion")
    for tower, depth in zip(towers, depths):
      towers[tower]["depth"] = depth
  if "vocab" in d:
    towers["text"]["vocab_size"] = int(d.pop("vocab"))
  if "patch" in d:
    towers["vision"]["patch_size"] = int(d.pop("patch"))
  embed = int(d.pop("embed", cfg.embed_dim))
  if d:
    raise SystemExit(f"--dims: unknown keys {sorted(d)}")
  return cfg.replace(
    vision=dataclasses.replace(cfg.vision, **towers["vision"]),
    text=dataclasses.replace(cfg.text, **towers["text"]),
    fusion=dataclasses.replace(cfg.fusion, **towers["fusion"]),
    embed_dim=embed,
  )
