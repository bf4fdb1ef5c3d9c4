"""The model to evaluate, from any of the places trained weights live.

  * a training workdir (or its `checkpoints/` directory): the newest good checkpoint, restored
    with the trainer's own state layout and checksums (`train_lib`), params only are kept;
  * a params directory (`params_io.save_params`, e.g. `<workdir>/export/params`);
  * an official X2-VLM `.th` (or its `.safetensors` copy), converted on the fly
    (`x2vlm_jax.convert.official`, needs torch for `.th`).

The architecture always comes from the config's `model` section (the same config file the run
was trained with), so a checkpoint of another architecture fails with a message naming the
mismatching parameters instead of evaluating garbage.
"""

from __future__ import annotations

import pathlib

import jax
from flax import nnx

from x2vlm_jax import init_lib
from x2vlm_jax import params_io
from x2vlm_jax.models.x2vlm import X2VLM


def _checkpoint_dir(path: pathlib.Path) -> pathlib.Path | None:
  """`path` itself or `path/checkpoints` when it holds committed orbax steps."""
  from x2vlm_jax import train_lib  # pylint: disable=g-import-not-at-top
  for cand in (path / train_lib.CKPT_DIR, path):
    if cand.is_dir() and any(c.name.isdigit() for c in cand.iterdir()):
      return cand
  return None


def from_checkpoint(cfg, ckpt_dir: pathlib.Path, mesh, step: int | None = None) -> tuple[X2VLM, int]:
  """(model, step) from the trainer's newest good checkpoint (or exactly `step`)."""
  from x2vlm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from x2vlm_jax import train_lib  # pylint: disable=g-import-not-at-top

  model_cfg = init_lib.model_config(cfg)
  with ckpt_lib.CheckpointManager(ckpt_dir, max_to_keep=None) as manager:
    fresh = tuple(manager.saved_config(step).get("_fresh_paths", ()))
    m = train_lib._build(cfg, model_cfg, mesh, fresh)  # pylint: disable=protected-access
    target = train_lib._restore_target(m, mesh)  # pylint: disable=protected-access
    restored = manager.restore(target, step=step)
  model_state = jax.tree.map(lambda x: x, m.abstract_params)
  nnx.replace_by_pure_dict(model_state, restored.state["train"]["params"])
  return nnx.merge(m.graphdef, model_state), int(restored.step)


def load_model(cfg, mesh, *, checkpoint: str = "", official_th: str = "",
               step: int | None = None) -> tuple[X2VLM, str]:
  """(model born sharded on `mesh`, a one-line description of where the weights came from).

  Exactly one of `checkpoint` (workdir, checkpoints dir or params dir) and `official_th`.
  """
  if bool(checkpoint) == bool(official_th):
    raise ValueError("give exactly one of --checkpoint (a training workdir, its checkpoints "
                     "directory or a params directory) and --official_th")
  if official_th:
    cfg = _with_init(cfg, official_th=official_th)
    init = init_lib.initialize(cfg, init_lib.model_config(cfg), mesh, jax.random.key(0))
    missing = len(init.fresh_paths)
    return init.model, f"official checkpoint {official_th} ({missing} parameters not in the file)"
  path = pathlib.Path(checkpoint)
  if not path.exists():
    raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or directory")
  if (path / params_io.CONFIG_FILE).exists():
    cfg = _with_init(cfg, params_dir=str(path))
    init = init_lib.initialize(cfg, init_lib.model_config(cfg), mesh, jax.random.key(0))
    if init.fresh_paths:
      raise ValueError(f"{path}: parameters {list(init.fresh_paths)[:5]} are missing from the "
                       "params directory; refusing to evaluate freshly initialised weights")
    return init.model, f"params directory {path}"
  ckpt_dir = _checkpoint_dir(path)
  if ckpt_dir is None:
    raise FileNotFoundError(f"--checkpoint {checkpoint}: neither a params directory (no "
                            f"{params_io.CONFIG_FILE}) nor a workdir / checkpoints directory "
                            "with committed steps")
  model, at = from_checkpoint(cfg, ckpt_dir, mesh, step)
  return model, f"checkpoint {ckpt_dir} step {at}"


def _with_init(cfg, **init):
  """A copy of the config whose `init` section names only the given weight source."""
  cfg = cfg.copy_and_resolve_references()  # existing keys stay settable on a locked config
  for key in ("bert_dir", "beit_path", "official_th", "params_dir"):
    cfg.init[key] = init.get(key, "")
  return cfg
