"""A run's final weights in every format users load: our params directory, safetensors and the
official `.th` (when torch is importable), under `<workdir>/export`. An MVPTR run writes our
params directory and `model.safetensors` with the official MVPTR state-dict names
(`convert.mvptr.params_to_mvptr`; the official code reads a plain PyTorch state dict)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from etils import epath

from x2vlm_jax import params_io
from x2vlm_jax.models import family
from x2vlm_jax.models.config import ModelConfig


def export_params(
  workdir: epath.Path, model_cfg: ModelConfig, params: dict, log: Callable[[str], None]
) -> None:
  """Writes `workdir/export/{params, model.safetensors, model.th}`; every process calls it."""
  from x2vlm_jax.convert import official  # pylint: disable=g-import-not-at-top
  from x2vlm_jax.convert.official_config import official_config_dict  # pylint: disable=g-import-not-at-top
  from x2vlm_jax.convert.safetensors_io import save_safetensors  # pylint: disable=g-import-not-at-top

  out = workdir / "export"
  params_io.save_params(out / "params", model_cfg, params)  # collective: all processes
  if jax.process_count() == 1:
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
  else:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    host = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
  if jax.process_index() != 0:
    return
  if family.name(model_cfg) == "mvptr":
    from x2vlm_jax.convert.mvptr import params_to_mvptr  # pylint: disable=g-import-not-at-top

    config = params_io.config_to_dict(model_cfg)
    save_safetensors(out / "model.safetensors", params_to_mvptr(host, model_cfg), config)
    log(f"export: {out}/params, model.safetensors (official MVPTR names)")
    return
  sd = official.params_to_official(host, model_cfg)
  cfg_dict = official_config_dict(model_cfg)
  save_safetensors(out / "model.safetensors", sd, cfg_dict)
  try:
    from x2vlm_jax.convert.torch_io import save_th  # pylint: disable=g-import-not-at-top

    save_th(out / "model.th", sd, cfg_dict)
    log(f"export: {out}/params, model.safetensors, model.th")
  except ImportError as e:
    log(f"export: {out}/params, model.safetensors; official .th skipped ({e})")
