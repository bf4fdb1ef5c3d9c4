"""Speed of retrieval evaluation with ITM re-ranking, scaled down, projected to COCO 5K x 25K.

  python bench/eval.py [--variant tiny|base|large --dims ... --image_res 224 --num_images 500
      --texts_per_image 5 --k_test 128 --batch 64 --itm_chunk 256 --max_tokens 30
      --dtype float32|bfloat16 --attention einsum|xla|cudnn --mesh data=1 --out rows.jsonl
      --no_cpu_host_tuning]

Runs the evaluator's own code (`evaluators.run.run_retrieval`: the jitted image / text encoders
over fixed-size batches, the ITC similarities, the official top-k ITM re-ranking in chunks of
`--itm_chunk` pairs, each distinct pair scored once, from every image's cross-attention K/V
computed once where they fit: `run.kv_budget`) on random images and captions, after one
untimed warm-up run on a few images that compiles every function. Prints one JSON object:

  encode_images_s / encode_texts_s  the two encoders over the whole set (timed separately, the
                                    same jitted functions);
  total_s                           the whole `run_retrieval` (encoders + ITC + re-ranking);
  rerank_s                          total_s - the two encoder times: ITC similarities, top-k and
                                    the ITM passes;
  itm_pairs, itm_pairs_per_s        distinct (image, text) pairs scored by ITM (chunks padded);
  itm_route                         K/V computed once per image, or per chunk (`run.kv_budget`);
  images_per_s                      images of the set evaluated per second (whole evaluation);
  projected_coco_s                  COCO 5K images x 25K texts at the same k: encoders scaled by
                                    the number of images / texts, ITM by (5K + 25K) x k pairs
                                    (every query's top k; the few pairs that are candidates in
                                    both directions are counted twice, so an upper bound) at the
                                    measured pair rate. The ITC similarity matrix (5K x 25K x E
                                    on the host) is not in the projection: seconds at most.

Random weights rank at chance, so recall is meaningless here; only time is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

COCO_IMAGES, COCO_TEXTS = 5000, 25000


def _args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--variant", default="tiny", choices=["tiny", "demo", "base", "large"])
  p.add_argument("--dims", default="", help="model dimensions (bench/dims.py)")
  p.add_argument("--image_res", type=int, default=None, help="default: the variant's")
  p.add_argument("--num_images", type=int, default=500)
  p.add_argument("--texts_per_image", type=int, default=5)
  p.add_argument("--k_test", type=int, default=128)
  p.add_argument("--batch", type=int, default=64, help="images / texts per encoder call")
  p.add_argument("--itm_chunk", type=int, default=256, help="pairs per ITM call")
  p.add_argument("--max_tokens", type=int, default=30)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--attention", default="einsum", choices=["einsum", "xla", "cudnn"])
  p.add_argument("--mesh", default="data=-1")
  p.add_argument(
    "--no_cpu_host_tuning",
    action="store_true",
    help="leave glibc's malloc defaults (x2vlm_jax.cpu_host; eval.py keeps the heap: A/B)",
  )
  p.add_argument("--tag", default="", help="a name for the row (bench/gpu.sh: the row name)")
  p.add_argument("--out", default="", help="also append the JSON row to this file")
  return p.parse_args()


def _random_set(cfg, n_img: int, per_image: int, length: int, seed: int):
  import numpy as np

  from x2vlm_jax.evaluators.eval_data import RetrievalSet

  rng = np.random.default_rng(seed)
  r, n_txt = cfg.vision.image_size, n_img * per_image
  lengths = rng.integers(4, length + 1, n_txt)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, cfg.text.vocab_size, (n_txt, length)).astype(np.int32)
  ids = np.where(mask > 0, ids, 0)
  ids[:, 0] = 101 % cfg.text.vocab_size  # [CLS]
  txt2img = np.repeat(np.arange(n_img), per_image)
  return RetrievalSet(
    pixels=rng.integers(0, 256, (n_img, r, r, 3), dtype=np.uint8),
    ids=ids,
    mask=mask,
    txt2img=txt2img,
    img2txt=[list(range(i * per_image, (i + 1) * per_image)) for i in range(n_img)],
    captions=[""] * n_txt,
    image_ids=[str(i) for i in range(n_img)],
    skips={},
  )


def _report(args, cfg, mesh, model, data, times, pairs) -> dict:
  """The printed JSON object (fields in the module docstring); `pairs` counts the ITM rows the
  device computed (chunks padded to full size)."""
  import jax
  from flax import nnx

  n_img, n_txt = args.num_images, len(data.captions)
  enc_i, enc_t, total = times["images"], times["texts"], times["total"]
  rerank = max(total - enc_i - enc_t, 1e-9)
  pair_rate = pairs / rerank
  coco_pairs = (COCO_IMAGES + COCO_TEXTS) * args.k_test
  projected = {
    "encode_images_s": enc_i * COCO_IMAGES / n_img,
    "encode_texts_s": enc_t * COCO_TEXTS / n_txt,
    "itm_s": coco_pairs / pair_rate,
  }
  out = {
    "device": jax.devices()[0].device_kind,
    "num_devices": int(mesh.devices.size),
    "variant": args.variant,
    "dims": args.dims or None,
    "tag": args.tag or None,
    "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
    "dtype": args.dtype,
    "attention": args.attention,
    "image_res": cfg.vision.image_size,
    "num_images": n_img,
    "num_texts": n_txt,
    "k_test": args.k_test,
    "batch": args.batch,
    "itm_chunk": args.itm_chunk,
    "warmup_compile_s": round(times["warmup"], 2),
    "encode_images_s": round(enc_i, 3),
    "encode_texts_s": round(enc_t, 3),
    "total_s": round(total, 3),
    "rerank_s": round(rerank, 3),
    "itm_pairs": pairs,
    "itm_pairs_per_s": round(pair_rate, 2),
    "images_per_s": round(n_img / total, 3),
    "projected_coco": {k: round(v, 1) for k, v in projected.items()},
    "projected_coco_s": round(sum(projected.values()), 1),
  }
  return out


def main():
  args = _args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import dims as dims_lib
  import jax
  import jax.numpy as jnp

  from x2vlm_jax import cpu_host, sharding
  from x2vlm_jax.evaluators import run as eval_run
  from x2vlm_jax.models.config import ModelConfig
  from x2vlm_jax.models.x2vlm import create_sharded

  host = cpu_host.setup(not args.no_cpu_host_tuning)  # as eval.py does

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  cfg = dims_lib.with_dims(
    ModelConfig.named(args.variant, dtype=dtype, attention=args.attention), args.dims
  )
  if args.image_res:
    import dataclasses

    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, image_size=args.image_res))
  shape = {k: int(v) for k, v in (p.split("=") for p in args.mesh.split(",") if p)}
  mesh = sharding.make_mesh(shape)
  model = create_sharded(cfg, mesh, jax.random.key(0, impl="rbg"))
  fns = eval_run._Fns(model, mesh)  # pylint: disable=protected-access
  count = {"pairs": 0}

  def counting(itm, route: str):  # both ITM scorers count their pairs and say which ran
    def fn(state, vision, text, mask, img, txt):
      count["pairs"] += img.shape[0]
      count["route"] = route
      return itm(state, vision, text, mask, img, txt)

    return fn

  fns.itm = counting(fns.itm, "per-chunk K/V")
  fns.itm_kv = counting(fns.itm_kv, "K/V computed once per image")
  run = lambda data: eval_run.run_retrieval(fns, data, args.batch, args.k_test, args.itm_chunk)

  t0 = time.perf_counter()
  run(_random_set(cfg, 4, args.texts_per_image, args.max_tokens, seed=1))  # compiles everything
  warmup_s = time.perf_counter() - t0
  data = _random_set(cfg, args.num_images, args.texts_per_image, args.max_tokens, seed=0)
  t0 = time.perf_counter()
  fns.batched(fns.encode_images, args.batch, data.pixels)
  t1 = time.perf_counter()
  fns.batched(fns.encode_texts, args.batch, data.ids, data.mask)
  t2 = time.perf_counter()
  count["pairs"] = 0
  run(data)
  t3 = time.perf_counter()
  times = {"warmup": warmup_s, "images": t1 - t0, "texts": t2 - t1, "total": t3 - t2}
  out = _report(args, cfg, mesh, model, data, times, count["pairs"])
  out["itm_route"] = count.get("route")
  out["cpu_host"] = host
  print(json.dumps(out, indent=1))
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
  main()
