"""AdamW as the official code runs it, its schedule, and the parameter groups.

Official behaviour: docs/fidelity.md#optimiser-and-schedule.

The optimizer is one optax chain:

  clip_by_global_norm(1.0) -> scale_by_hf_adam(0.9, 0.98, 1e-8) -> hf_lr_and_decay(schedule, groups)

`clip_by_global_norm` scales like PyTorch's `clip_grad_norm_` (coefficient max / (norm + 1e-6),
applied only when below 1), which the official loop uses (docs/fidelity.md#gradient-clipping);
optax's version has no 1e-6.

`scale_by_hf_adam` is the Adam direction of HF transformers' `AdamW` (the official optimizer):
eps is added to the *uncorrected* sqrt(v) and the bias correction is folded into the step size,
sqrt(1 - b2^t) / (1 - b1^t). `hf_lr_and_decay` applies each parameter's learning rate and then the
decoupled weight decay *on the already updated value*, p <- p' - lr * wd * p'
(docs/fidelity.md#hf-adamw).

Parameter groups decide, per parameter path of our tree (docs/architecture.md), the weight decay
(0.01 or 0) and a learning-rate factor (1, `lr_mult` for freshly initialised parameters, or a
per-tower rate for fine-tuning). The weight-decay rules are an explicit table on *our* paths that
reproduces the official substring rule (docs/fidelity.md#weight-decay-by-substring); every
LayerNorm scale must be listed in it (an unlisted `*.scale` raises) so a new norm cannot silently
get the wrong decay.

Not done here: `temp` is clamped to [0.001, 0.5] by the train step before every step, not by the
optimizer; `temp` itself gets weight decay and, when fresh, lr x 2
(docs/fidelity.md#temperature-clamp).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from x2vlm_jax import treepath


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer and schedule settings (defaults = official pre-training).

  Official behaviour: docs/fidelity.md#optimiser-and-schedule.

  `warmup_steps` is a step count, or a fraction of `total_steps` when < 1 (fine-tuning configs).
  `vision_lr` / `text_lr` / `fusion_lr` (absolute rates, fine-tuning only) take precedence over
  `lr_mult` for the parameters of that tower; `fusion_lr` defaults to `text_lr`, because the
  official fusion layers are layers 12-17 of `text_encoder` and so follow `text_lr`.
  """

  lr: float = 1e-4
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-8
  weight_decay: float = 0.01
  lr_mult: float = 2.0
  clip_norm: float | None = 1.0
  total_steps: int = 1
  warmup_steps: float = 0
  min_lr: float = 0.0
  vision_lr: float | None = None
  text_lr: float | None = None
  fusion_lr: float | None = None
  # Path prefixes that get lr x lr_mult even though they were loaded: the official VQA
  # `large_lr_for_dec` puts the whole answer decoder there (('text_decoder',)).
  mult_paths: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "mult_paths", tuple(self.mult_paths))
    if self.total_steps < 1:
      raise ValueError(f"OptimConfig.total_steps must be >= 1, got {self.total_steps}")
    if self.lr <= 0:
      raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr}")
    if not 0 <= self.warmup_steps:
      raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
    if self.num_warmup > self.total_steps:
      raise ValueError(
        f"OptimConfig: warmup ({self.num_warmup}) exceeds total_steps ({self.total_steps})"
      )

  @property
  def num_warmup(self) -> int:
    """Warm-up length in steps (a fraction < 1 is taken of total_steps, rounded down)."""
    w = self.warmup_steps
    return int(w * self.total_steps) if 0 < w < 1 else int(w)


# --------------------------------------------------------------------------------------------
# schedule (docs/fidelity.md#linear-warm-up-and-decay)


def lr_factor_schedule(cfg: OptimConfig) -> Callable[[Any], jnp.ndarray]:
  """step -> learning-rate factor in [0, 1], shared by all groups (a LambdaLR factor).

  step < W: step / W, so the very first update (step 0) uses lr 0
  (docs/fidelity.md#linear-warm-up-and-decay); afterwards
  max(0, (N - step) / (N - W)), reaching 0 at N = total_steps. With `min_lr` > 0 the decay
  phase is floored at min_lr / lr (every group keeps its ratio to the base rate).
  """
  n, w = cfg.total_steps, cfg.num_warmup
  floor = cfg.min_lr / cfg.lr

  def factor(step):
    step = jnp.asarray(step, jnp.float32)
    warm = step / max(w, 1)
    decay = jnp.maximum(0.0, (n - step) / max(n - w, 1))
    if floor > 0:
      decay = jnp.maximum(decay, floor)
    return jnp.where(step < w, warm, decay)

  return factor


def lr_schedule(cfg: OptimConfig) -> Callable[[Any], jnp.ndarray]:
  """step -> learning rate of the base group (cfg.lr x factor); for logging."""
  factor = lr_factor_schedule(cfg)
  return lambda step: cfg.lr * factor(step)


# --------------------------------------------------------------------------------------------
# parameter groups (docs/fidelity.md#weight-decay-by-substring,
# docs/fidelity.md#learning-rate-multiplier-for-fresh-parameters)

# Weight decay on our paths; first matching glob wins. The third column is the official name the
# substring rule ('bias', 'LayerNorm.weight', 'norm.weight', 'norm1.weight', ...) sees.
WEIGHT_DECAY_RULES: tuple[tuple[str, bool, str], ...] = (
  ("itm_head.norm.scale", True, "itm_head.1.weight matches no substring"),
  ("box_head.norm.scale", True, "bbox_head.1.weight matches no substring"),
  ("cls_head.norm.scale", True, "cls_head.1.weight matches no substring"),
  (
    "*bias",
    False,
    "every bias, q_bias/v_bias, relative_position_bias_table, cls.predictions.bias, LayerNorm.bias",
  ),
  ("vision.*norm1.scale", False, "blocks.i.norm1.weight"),
  ("vision.*norm2.scale", False, "blocks.i.norm2.weight"),
  ("vision.fc_norm.scale", False, "fc_norm.weight contains norm.weight"),
  ("text.*norm.scale", False, "embeddings / attention.output / output .LayerNorm.weight"),
  ("fusion.*norm.scale", False, "attention / crossattention / output .LayerNorm.weight"),
  ("mlm_head.norm.scale", False, "cls.predictions.transform.LayerNorm.weight"),
  ("text_decoder.*norm.scale", False, "text_decoder.* .LayerNorm.weight (the VQA decoder)"),
  # MVPTR (docs/mvptr.md): the official no-decay list is ['bias', 'LayerNorm.weight'].
  ("embeddings.norm.scale", False, "MVPTR bert.embeddings.LayerNorm.weight"),
  ("txt_encoder.*norm.scale", False, "MVPTR bert.txt_encoder.layer.i.* .LayerNorm.weight"),
  ("vis_encoder.*norm.scale", False, "MVPTR bert.vis_encoder.layer.i.* .LayerNorm.weight"),
  ("mul_encoder.*norm.scale", False, "MVPTR bert.mul_encoder.layer.i.* .LayerNorm.weight"),
  ("tag_mlm_head.norm.scale", False, "MVPTR half_mlm.transform.LayerNorm.weight"),
  ("phrase_mlm_head.norm.scale", False, "MVPTR paper's phrase head (no official key)"),
  ("vqa_head.norm.scale", False, "MVPTR VQA cls.predictions.transform.LayerNorm.weight"),
)
# Everything else decays: kernels, embedding tables, gamma_1/gamma_2, cls_token, temp,
# frame_embed: none of their official names contains a no-decay substring
# (docs/fidelity.md#weight-decay-by-substring).

# Towers for the optional per-tower learning rates (fine-tuning,
# docs/fidelity.md#per-tower-learning-rates).
_TOWER_OF_PREFIX = {"vision": "vision", "text": "text", "mlm_head": "text", "fusion": "fusion"}

# Parameters not loaded from BEiT / BERT in from-scratch pre-training: the official
# `init_params` (docs/fidelity.md#learning-rate-multiplier-for-fresh-parameters).
FROM_SCRATCH_FRESH = (
  "vision_proj",
  "text_proj",
  "temp",
  "itm_head",
  "box_head",
  "fusion.layers.cross_attn",
  "fusion.layers.cross_norm",
  "frame_embed",
)


class ParamGroup(NamedTuple):
  """A parameter group: `name`, lr factor relative to cfg.lr, and weight decay."""

  name: str
  lr_factor: float
  weight_decay: float


def decays(path: str) -> bool:
  """Whether the parameter at `path` gets weight decay (WEIGHT_DECAY_RULES)."""
  for pattern, decay, _ in WEIGHT_DECAY_RULES:
    if fnmatch.fnmatchcase(path, pattern):
      return decay
  if path.endswith(".scale") or path == "scale":
    raise ValueError(
      f"parameter {path!r} looks like a LayerNorm scale but no weight-decay rule "
      f"covers it; add it to optim.WEIGHT_DECAY_RULES"
    )
  return True


def _is_fresh(path: str, fresh: Iterable[str]) -> bool:
  return any(path == f or path.startswith(f + ".") for f in fresh)


def param_group(path: str, fresh_paths: Iterable[str], cfg: OptimConfig) -> ParamGroup:
  """The group of one parameter: per-tower lr > lr_mult (fresh) > base; decay or no_decay."""
  decay = decays(path)
  tower = _TOWER_OF_PREFIX.get(path.split(".", 1)[0])
  fusion_lr = cfg.fusion_lr if cfg.fusion_lr is not None else cfg.text_lr
  tower_lr = {"vision": cfg.vision_lr, "text": cfg.text_lr, "fusion": fusion_lr}.get(tower)
  if tower_lr is not None:
    name, factor = tower, tower_lr / cfg.lr
  elif _is_fresh(path, fresh_paths) or _is_fresh(path, cfg.mult_paths):
    name, factor = "fresh", cfg.lr_mult
  else:
    name, factor = "base", 1.0
  return ParamGroup(
    f"{name}/{'decay' if decay else 'no_decay'}", float(factor), cfg.weight_decay if decay else 0.0
  )


def check_fresh_paths(params, fresh_paths: Iterable[str]) -> None:
  """Raises if a fresh path names no parameter of `params` (a typo would silently drop lr x 2)."""
  paths = [p for p, _ in treepath.flatten(params)]
  unknown = [f for f in fresh_paths if not any(_is_fresh(p, (f,)) for p in paths)]
  if unknown:
    raise ValueError(f"fresh_paths {unknown} match no parameter of the model")


def from_scratch_fresh_paths(params) -> tuple[str, ...]:
  """FROM_SCRATCH_FRESH restricted to the entries present in `params` (frame_embed is optional)."""
  paths = [p for p, _ in treepath.flatten(params)]
  return tuple(f for f in FROM_SCRATCH_FRESH if any(_is_fresh(p, (f,)) for p in paths))


def _numel(leaf) -> int:
  return int(math.prod(jnp.shape(leaf)))


def param_groups_report(params_tree, fresh_paths: Iterable[str], cfg: OptimConfig) -> str:
  """A table of the groups: name, #tensors, #params, lr factor, peak lr, weight decay."""
  fresh_paths = tuple(fresh_paths)
  check_fresh_paths(params_tree, fresh_paths)
  rows: dict[ParamGroup, list[int]] = {}
  for path, leaf in treepath.flatten(params_tree):
    count = rows.setdefault(param_group(path, fresh_paths, cfg), [0, 0])
    count[0] += 1
    count[1] += _numel(leaf)
  lines = [f"{'group':<18} {'tensors':>8} {'params':>14} {'lr x':>6} {'peak lr':>10} {'wd':>6}"]
  for g in sorted(rows):
    n_t, n_p = rows[g]
    lines.append(
      f"{g.name:<18} {n_t:>8} {n_p:>14,} {g.lr_factor:>6g} "
      f"{cfg.lr * g.lr_factor:>10.3g} {g.weight_decay:>6g}"
    )
  total_t = sum(r[0] for r in rows.values())
  total_p = sum(r[1] for r in rows.values())
  lines.append(f"{'total':<18} {total_t:>8} {total_p:>14,}")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the optax transformations (docs/fidelity.md#hf-adamw)


def clip_by_global_norm(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
  """Global-L2-norm clipping as `torch.nn.utils.clip_grad_norm_`: g * min(1, max / (norm + eps))."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    coef = jnp.minimum(1.0, max_norm / (norm + eps))
    return jax.tree.map(lambda g: (g * coef).astype(jnp.result_type(g)), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


class HFAdamState(NamedTuple):
  """Step count and the float32 first and second moments."""

  count: jnp.ndarray
  mu: Any
  nu: Any


def scale_by_hf_adam(
  b1: float = 0.9, b2: float = 0.98, eps: float = 1e-8
) -> optax.GradientTransformation:
  """Adam direction of HF `AdamW`: sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).

  eps is added to the uncorrected sqrt(v) (optax's `scale_by_adam` adds it to the corrected
  one), so the two differ when v is small. Positive sign: the learning rate comes later.
  """

  def init_fn(params):
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    return HFAdamState(
      jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
    )

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(
      lambda g, m: b1 * m + (1 - b1) * jnp.asarray(g, jnp.float32), updates, state.mu
    )
    nu = jax.tree.map(
      lambda g, v: b2 * v + (1 - b2) * jnp.square(jnp.asarray(g, jnp.float32)), updates, state.nu
    )
    t = count.astype(jnp.float32)
    step_size = jnp.sqrt(1 - b2**t) / (1 - b1**t)
    direction = jax.tree.map(lambda m, v: step_size * m / (jnp.sqrt(v) + eps), mu, nu)
    return direction, HFAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


class LrDecayState(NamedTuple):
  """Step count of the learning-rate schedule (0 for the first update)."""

  count: jnp.ndarray


def hf_lr_and_decay(
  schedule: Callable[[Any], jnp.ndarray], group_of: Callable[[str], ParamGroup]
) -> optax.GradientTransformation:
  """Per-parameter lr and HF-style decoupled weight decay on the updated value.

  With lr_p = schedule(count) * group.lr_factor and d the Adam direction:
    p' = p - lr_p * d;  p'' = p' - lr_p * wd * p'   (returned as the update p'' - p).
  `schedule(count)` is the base learning rate; `group_of(path)` gives the group of a path.
  """

  def init_fn(params):
    del params
    return LrDecayState(jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("hf_lr_and_decay needs params (decoupled weight decay)")
    lr = jnp.asarray(schedule(state.count), jnp.float32)

    def one(keypath, d, p):
      group = group_of(treepath.path_str(keypath))
      lr_p = lr * group.lr_factor
      u = -lr_p * d
      if group.weight_decay:
        u = u - lr_p * group.weight_decay * (jnp.asarray(p, jnp.float32) + u)
      return u.astype(jnp.result_type(p))

    new = jax.tree_util.tree_map_with_path(one, updates, params)
    return new, LrDecayState(state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
  cfg: OptimConfig, fresh_paths: Iterable[str] = ()
) -> optax.GradientTransformation:
  """The full chain: global-norm clipping, HF Adam, per-group lr schedule and weight decay.

  `fresh_paths`: path prefixes of parameters that were freshly initialised (not loaded from a
  checkpoint); they get lr x cfg.lr_mult. Checked against the parameters at `init`.
  """
  fresh_paths = tuple(fresh_paths)
  cache: dict[str, ParamGroup] = {}

  def group_of(path: str) -> ParamGroup:
    if path not in cache:
      cache[path] = param_group(path, fresh_paths, cfg)
    return cache[path]

  base = optax.chain(
    clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
    scale_by_hf_adam(cfg.b1, cfg.b2, cfg.eps),
    hf_lr_and_decay(lr_schedule(cfg), group_of),
  )

  def init_fn(params):
    # `optax.tree_map_params` (train_state.py) calls init on a leafless placeholder tree to
    # find the parameter-shaped parts of the state; there is nothing to check then.
    if jax.tree.leaves(params):
      check_fresh_paths(params, fresh_paths + cfg.mult_paths)
      for path, _ in treepath.flatten(params):
        group_of(path)  # fail at init, not inside the jitted step, on an unclassified parameter
    return base.init(params)

  return optax.GradientTransformation(init_fn, base.update)
