"""Analytic FLOPs of one training step (pre-training or a fine-tuning task's objectives), for MFU.

XLA's `compiled.cost_analysis()` counts the body of a loop once, and every tower is scanned over
its layers, so it under-counts the step (base: 0.458 vs 2.944 TFLOP). This counts the matmuls and
attention of every tower call and fusion pass instead; backward = 2 x forward, remat
recomputation not counted. `sizes` are the batch sizes the count is for (global for MFU over the
whole mesh).
"""

from __future__ import annotations

ALL = ("itc", "itm", "mlm", "box")


def step_flops(cfg, sizes, itm: bool = True, objectives=ALL) -> float:
  """Analytic matmul + attention FLOPs of one training step (forward x 3), see the docstring.

  objectives: those the step computes (the ITM passes also need `itm`); the masked texts and
  MLM passes count only with 'mlm', the box pass only with 'box'.
  """
  mlm_on, box_on = "mlm" in objectives, "box" in objectives
  itm = itm and "itm" in objectives
  v, t, f = cfg.vision, cfg.text, cfg.fusion
  s_v, length = v.num_patches + 1, sizes.max_tokens
  n_img = sizes.image_batch + sizes.region_max_images + sizes.video_batch * sizes.frame_len
  vision = (
    n_img * v.depth * (2 * s_v * (4 * v.width**2 + 2 * v.width * v.mlp_dim) + 4 * s_v**2 * v.width)
  )
  vision += n_img * 2 * v.num_patches * v.patch_size**2 * 3 * v.width  # patch embedding
  texts = sizes.image_batch + sizes.region_batch + sizes.video_batch
  text = (
    (2 if mlm_on else 1)
    * texts
    * t.depth
    * (2 * length * (4 * t.width**2 + 2 * t.width * t.mlp_dim) + 4 * length**2 * t.width)
  )
  rows = texts * (3 * itm + mlm_on) + sizes.region_batch * box_on  # ITM x3, MLM, box pass
  fusion = (
    rows
    * f.depth
    * (
      2 * length * (6 * t.width**2 + 2 * t.width * f.mlp_dim)
      + 4 * length**2 * t.width
      + 4 * length * s_v * t.width
    )
  )
  table = sizes.image_batch + sizes.region_max_images + sizes.video_batch
  kv = table * f.depth * 2 * s_v * 2 * v.width * t.width
  mlm = texts * sizes.max_masks * 2 * (t.width**2 + t.width * t.vocab_size) * mlm_on
  return 3.0 * (vision + text + fusion + kv + mlm)
