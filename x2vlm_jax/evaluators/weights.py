"""The model to evaluate, from any of the places trained weights live.

  * a training workdir (or its `checkpoints/` directory): the parameters of the newest good
    checkpoint, read and verified without the optimizer state (`train_state.restore_params`);
  * a params directory (`params_io.save_params`, e.g. `<workdir>/export/params`);
  * an official X2-VLM `.th` (or its `.safetensors` copy), converted on the fly
    (`x2vlm_jax.convert.official`, needs torch for `.th`).

The architecture always comes from the config's `model` section (the same config file the run
was trained with), so a checkpoint of another architecture fails with a message naming the
mismatching parameters instead of evaluating garbage.
"""

from __future__ import annotations

import jax
from etils import epath

from x2vlm_jax import checkpoint as ckpt_lib
from x2vlm_jax import init_lib, params_io, paths
from x2vlm_jax.models.config import ModelConfig
from x2vlm_jax.models.x2vlm import X2VLM
from x2vlm_jax.train_state import ParamLayout, restore_params


def _checkpoint_dir(path: epath.Path) -> epath.Path | None:
  """`path` itself or `path/checkpoints` when it holds committed orbax steps."""
  for cand in (path / ckpt_lib.CKPT_DIR, path):
    if cand.is_dir() and any(c.name.isdigit() for c in cand.iterdir()):
      return cand
  return None


def from_checkpoint(
  model_cfg: ModelConfig, ckpt_dir: epath.Path, mesh, step: int | None = None
) -> tuple[X2VLM, int]:
  """(model, step) from the trainer's newest good checkpoint (or exactly `step`)."""
  layout = ParamLayout.build(model_cfg, mesh)
  # Read-only: evaluating a run that is still training must not touch its saves in flight.
  with ckpt_lib.CheckpointManager(ckpt_dir, max_to_keep=None, read_only=True) as manager:
    params, at = restore_params(manager, layout, step)
  return layout.model(params), at


def _initialised(init: init_lib.InitConfig, model_cfg: ModelConfig, mesh):
  return init_lib.initialize(init, model_cfg, mesh, jax.random.key(0))


def load_model(
  model_cfg: ModelConfig,
  mesh,
  *,
  checkpoint: str = "",
  official_th: str = "",
  step: int | None = None,
) -> tuple[X2VLM, str]:
  """(model born sharded on `mesh`, a one-line description of where the weights came from).

  Exactly one of `checkpoint` (workdir, checkpoints dir or params dir) and `official_th`.
  """
  if bool(checkpoint) == bool(official_th):
    raise ValueError(
      "give exactly one of --checkpoint (a training workdir, its checkpoints "
      "directory or a params directory) and --official_th"
    )
  if official_th:
    init = _initialised(init_lib.InitConfig(official_th=official_th), model_cfg, mesh)
    missing = len(init.fresh_paths)
    return init.model, f"official checkpoint {official_th} ({missing} parameters not in the file)"
  path = paths.path(checkpoint)
  if not path.exists():
    raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or directory")
  if (path / params_io.CONFIG_FILE).exists():
    init = _initialised(init_lib.InitConfig(params_dir=str(path)), model_cfg, mesh)
    if init.fresh_paths:
      raise ValueError(
        f"{path}: parameters {list(init.fresh_paths)[:5]} are missing from the "
        "params directory; refusing to evaluate freshly initialised weights"
      )
    return init.model, f"params directory {path}"
  ckpt_dir = _checkpoint_dir(path)
  if ckpt_dir is None:
    raise FileNotFoundError(
      f"--checkpoint {checkpoint}: neither a params directory (no "
      f"{params_io.CONFIG_FILE}) nor a workdir / checkpoints directory "
      "with committed steps"
    )
  model, at = from_checkpoint(model_cfg, ckpt_dir, mesh, step)
  return model, f"checkpoint {ckpt_dir} step {at} (parameters only)"
