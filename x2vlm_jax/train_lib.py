"""The pre-training loop: everything `train.py` does after parsing flags.

`train_and_evaluate(config, workdir)`:
  1. mesh from config.mesh; global batch sizes -> per process;
  2. resume from the newest good checkpoint in `workdir/checkpoints` if there is one (config
     change check, data-iterator state of every stream and process), else initialise from the
     configured weights (init_lib) and a fresh optimizer;
  3. the jitted step (train_step.make_train_step; ITM and no-ITM variants compiled on demand);
  4. every step: preemption check, the data batch (aux coin), the step; delayed read of the
     previous step's metrics (non-finite counter, logging) so the host never waits for the
     device step it just dispatched;
  5. periodic logging / checkpointing / evaluation, profiling window, export at the end.

Exactness: the step key is fold_in(key(seed), step), data positions are checkpointed, so a run
resumed from step s reproduces the uninterrupted run bit for bit from s on.
"""

from __future__ import annotations

import dataclasses
import json
import logging as py_logging
import os
import pathlib
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from data_pipelines import features as F
from data_pipelines import global_batch
from x2vlm_jax import flops as flops_lib
from x2vlm_jax import checkpoint as ckpt_lib
from x2vlm_jax import init_lib
from x2vlm_jax import metrics_writer
from x2vlm_jax import optim
from x2vlm_jax import preemption
from x2vlm_jax import sharding
from x2vlm_jax import step_jit
from x2vlm_jax import train_data
from x2vlm_jax import train_step as ts
from x2vlm_jax.models.x2vlm import abstract_model

# Resuming with any of these changed is a different experiment (refused unless allowed).
CRITICAL_KEYS = ("model", "batch", "data.image", "data.region", "data.video", "data.aux",
                 "train.seed")
CKPT_DIR = "checkpoints"
EXAMPLE_IDS = "example_ids.p{}.jsonl"


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite updates: the run stops without saving a checkpoint."""


@dataclasses.dataclass
class RunResult:
  """How `train_and_evaluate` ended: 'done', 'preempted' or 'stopped' (train.stop_after)."""

  status: str
  step: int
  workdir: str


# ----------------------------------------------------------------------------------------------
# Set-up helpers.


class _QuietOrbax(py_logging.Filter):
  """Drops orbax's INFO records (a few dozen lines per checkpoint would bury the progress
  lines); its warnings and errors pass."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def _setup_logging(workdir: pathlib.Path) -> py_logging.Handler:
  name = "train.log" if jax.process_index() == 0 else f"train.p{jax.process_index()}.log"
  handler = py_logging.FileHandler(workdir / name)
  handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  quiet = _QuietOrbax()
  handler.addFilter(quiet)
  absl_handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in absl_handler.filters):
    absl_handler.addFilter(quiet)
  py_logging.getLogger().addHandler(handler)
  logging.set_verbosity(logging.INFO)
  return handler


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA cache for every compiled program (restarts reuse the compiled step)."""
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def step_config(cfg) -> ts.StepConfig:
  """StepConfig from the config's `loss` section."""
  return ts.StepConfig(iter_perc=dict(cfg.loss.iter_perc.to_dict()),
                       term_weights=dict(cfg.loss.term_weights.to_dict()),
                       neg_shards=int(cfg.loss.neg_shards),
                       itc_grad_world_size=int(cfg.loss.itc_grad_world_size))


def optim_config(cfg) -> optim.OptimConfig:
  """OptimConfig from the config's `optim` section (unknown fields are an error there)."""
  return optim.OptimConfig(**cfg.optim.to_dict())


def _nan_hook(steps):
  """grad_hook that puts NaN into every gradient at the given steps (fault tests)."""
  steps = jnp.asarray(sorted(int(s) for s in steps), jnp.int32)

  def hook(grads, step):
    bad = jnp.any(steps == step)
    return jax.tree.map(lambda g: jnp.where(bad, jnp.nan, g).astype(g.dtype), grads)

  return hook


def itm_for_step(cfg, step: int, aux_choice: Mapping[str, bool], image_aux: bool) -> bool:
  """Whether `step` computes ITM (§6.4 step 3): loss.itm, only before loss.stop_calc_itm
  (-1 = always), and with an aux image stream (1B stage 1) only on steps that drew the clean
  aux image batch -- for every kind of that step, regions included (§9.29)."""
  stop = int(cfg.loss.stop_calc_itm)
  itm = bool(cfg.loss.itm) and (stop < 0 or step < stop)
  if image_aux:
    itm = itm and bool(aux_choice.get(F.IMAGE, False))
  return itm


def _poison(local: dict) -> None:
  """Puts a NaN into one MLM weight of the host batch: loss and gradients become NaN, and the
  compiled step stays the one every other run uses (fault tests share its compilation cache)."""
  fields = local[next(iter(local))]
  w = np.array(fields[F.MLM_WEIGHTS], copy=True)
  w[0, 0] = np.nan
  fields[F.MLM_WEIGHTS] = w


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  """'10,15' -> (10, 15): trace steps [10, 15); '' -> None."""
  if not text:
    return None
  parts = [p for p in str(text).split(",") if p.strip()]
  if len(parts) != 2:
    raise ValueError(f"profile_steps {text!r}: expected 'first,last' (e.g. '10,15')")
  first, last = (int(p) for p in parts)
  if not 0 <= first < last:
    raise ValueError(f"profile_steps {text!r}: need 0 <= first < last")
  return first, last


def _truncate_jsonl(path: pathlib.Path, start_step: int) -> None:
  """Drops lines of steps >= start_step (they will be redone after a resume)."""
  if not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)["step"] < start_step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      continue  # a line cut by a kill -9
  path.write_text("".join(l + "\n" for l in keep))


# ----------------------------------------------------------------------------------------------
# State.


@dataclasses.dataclass
class _Model:
  """Everything derived from the model config: graph, abstract state, shardings, optimizer."""

  graphdef: object
  abstract_params: object  # nnx.State of ShapeDtypeStructs
  state_shardings: dict
  abstract_state: dict  # ShapeDtypeStructs with shardings (the restore target)
  tx: object
  fresh_paths: tuple


def _build(cfg, model_cfg, mesh, fresh_paths) -> _Model:
  graphdef, abstract_params = nnx.split(abstract_model(model_cfg), nnx.Param)
  tx = optim.make_optimizer(optim_config(cfg), fresh_paths)
  abstract = jax.eval_shape(lambda p: ts.init_state(p, tx), nnx.to_pure_dict(abstract_params))
  shardings = step_jit.train_state_shardings(abstract_params, tx, mesh)
  abstract = ckpt_lib.abstract_target(abstract, shardings)
  return _Model(graphdef, abstract_params, shardings, abstract, tx, tuple(fresh_paths))


def _restore_target(m: _Model, mesh) -> dict:
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
  return {"train": m.abstract_state, "rng": rng}


# ----------------------------------------------------------------------------------------------
# The loop.


class _MetricsWindow:
  """Per-step device metrics, read one step late, averaged at logging time."""

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.counts: dict[str, int] = {}

  def add(self, metrics: Mapping[str, float]):
    for k, v in metrics.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
      self.counts[k] = self.counts.get(k, 0) + 1

  def pop(self) -> dict[str, float]:
    out = {k: self.sums[k] / self.counts[k] for k in self.sums}
    self.sums, self.counts = {}, {}
    return out


def _progress_metrics(m: Mapping[str, float]) -> dict[str, float]:
  """'loss/itc/image' -> 'loss/itc_image' so the progress line shows every term."""
  out = {}
  for k, v in m.items():
    parts = k.split("/")
    if parts[0] == "loss":
      out["loss" if parts[1:] == ["total"] else "loss/" + "_".join(parts[1:])] = v
  return out


def _export(workdir: pathlib.Path, model_cfg, params, writer) -> None:
  """Params directory + safetensors + official .th (if torch is importable), process 0."""
  from x2vlm_jax import params_io  # pylint: disable=g-import-not-at-top
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
  sd = official.params_to_official(host, model_cfg)
  cfg_dict = official_config_dict(model_cfg)
  save_safetensors(out / "model.safetensors", sd, cfg_dict)
  try:
    from x2vlm_jax.convert.torch_io import save_th  # pylint: disable=g-import-not-at-top
    save_th(out / "model.th", sd, cfg_dict)
    writer.log(f"export: {out}/params, model.safetensors, model.th")
  except ImportError as e:
    writer.log(f"export: {out}/params, model.safetensors; official .th skipped ({e})")


def train_and_evaluate(config, workdir: str | os.PathLike, *, allow_config_change: bool = False,
                       profile_steps: str = "") -> RunResult:
  """Runs (or resumes) training as configured; see the module docstring.

  Raises:
    NonFiniteError: `train.max_consecutive_nonfinite` consecutive updates were skipped.
    checkpoint.ConfigChangedError: a critical setting differs from the checkpoint.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log_handler = _setup_logging(workdir)
  t_start = time.time()
  cfg = config
  tr = cfg.train
  enable_compilation_cache(tr.compilation_cache_dir)
  pi, pc = jax.process_index(), jax.process_count()
  profile = parse_profile_steps(profile_steps or tr.profile_steps)

  mesh = sharding.make_mesh(cfg.mesh.to_dict())
  model_cfg = init_lib.model_config(cfg)
  accum = int(tr.accum_steps)
  sizes = train_data.local_batch_sizes(cfg, mesh, pc, accum)  # one micro-batch
  total_steps = int(tr.total_steps)
  stop_after = int(tr.stop_after)
  logging.info("process %d/%d, %d devices, mesh %s; per-process batch sizes %s", pi, pc,
               jax.device_count(), dict(mesh.shape), sizes)

  writer = metrics_writer.MetricsWriter(workdir)
  manager = ckpt_lib.CheckpointManager(workdir / CKPT_DIR, max_to_keep=int(tr.keep),
                                       keep_every=int(tr.keep_every) or None,
                                       async_save=bool(tr.async_checkpoint))
  base_key = jax.random.key(int(tr.seed))
  config_json = ckpt_lib.to_jsonable(cfg)

  # --- state: resume or initialise ------------------------------------------------------------
  restored = None
  if manager.latest_step() is not None:
    saved_cfg = manager.saved_config()
    fresh = tuple(saved_cfg.get("_fresh_paths", ()))
    m = _build(cfg, model_cfg, mesh, fresh)
    restored = manager.restore(_restore_target(m, mesh), config=config_json,
                               critical_keys=CRITICAL_KEYS, allow_config_change=allow_config_change)
    state = restored.state["train"]
    saved_rng = np.asarray(restored.state["rng"].addressable_data(0))
    if not np.array_equal(saved_rng, np.asarray(jax.random.key_data(base_key))):
      raise ckpt_lib.ConfigChangedError("the checkpoint's PRNG key differs from key(train.seed)")
    start_step = int(restored.step)
    for why in restored.skipped:
      writer.log(f"checkpoint: rejected newer step: {why}")
    writer.log(f"resumed from step {start_step} ({workdir / CKPT_DIR})")
  else:
    # Initializers draw from an 'unsafe_rbg' key: its init program compiles much faster on CPU
    # than threefry's, and initial values need no cross-platform reproducibility.
    init_key = jax.random.key(int(tr.seed), impl="unsafe_rbg")
    init = init_lib.initialize(cfg, model_cfg, mesh, init_key)
    m = _build(cfg, model_cfg, mesh, init.fresh_paths)
    params = nnx.to_pure_dict(nnx.state(init.model, nnx.Param))
    del init
    state = jax.jit(lambda p: ts.init_state(p, m.tx), out_shardings=m.state_shardings)(params)
    start_step = 0
  config_json["_fresh_paths"] = list(m.fresh_paths)

  # --- reports at start (process 0) ----------------------------------------------------------
  if pi == 0:
    from clu import parameter_overview  # pylint: disable=g-import-not-at-top
    overview = parameter_overview.get_parameter_overview(
        nnx.to_pure_dict(m.abstract_params), include_stats=False)
    report = "\n".join([
        "parameter overview:\n" + overview,
        "sharding report:\n" + sharding.sharding_report(m.abstract_params, mesh),
        "parameter groups:\n" + optim.param_groups_report(m.abstract_params, m.fresh_paths,
                                                          optim_config(cfg)),
    ])
    (workdir / "reports.txt").write_text(report + "\n")
    logging.info("%s", report)
    writer.write_text(start_step, "config", "```\n" + json.dumps(config_json, indent=1) + "\n```")

  # --- data -------------------------------------------------------------------------------------
  from data_pipelines.text_ops import Tokenizer  # pylint: disable=g-import-not-at-top
  tokenizer = Tokenizer(train_data.tokenizer_dir(cfg), int(cfg.data.max_tokens))
  streams = train_data.DataStreams(cfg, sizes, train_data.preproc_config(cfg), tokenizer,
                                   int(tr.seed), pi, pc)
  if restored is not None:
    saved_pc = len(restored.data_iter)
    mine = restored.data_iter.get(f"process_{pi}")
    if saved_pc != pc or mine is None:
      msg = (f"the checkpoint holds data state for {saved_pc} processes, this run has {pc}")
      if not allow_config_change:
        raise ckpt_lib.ConfigChangedError(msg + "; pass --allow_config_change to restart the "
                                          "data streams from their beginning")
      logging.warning("%s: data streams restart from their beginning", msg)
    else:
      streams.set_state(mine)

  ids_path = workdir / EXAMPLE_IDS.format(pi)
  if tr.log_example_ids:
    _truncate_jsonl(ids_path, start_step)
  if pi == 0 and restored is not None:
    writer.close()
    _truncate_jsonl(workdir / metrics_writer.JSONL_NAME, start_step + 1)
    writer = metrics_writer.MetricsWriter(workdir)

  # --- the step ---------------------------------------------------------------------------------
  nan_steps = frozenset(int(x) for x in tr.debug_nan_steps)
  if tr.debug_nan_in not in ("grads", "data"):
    raise ValueError(f"config.train.debug_nan_in must be 'grads' or 'data', got {tr.debug_nan_in!r}")
  hook = _nan_hook(nan_steps) if nan_steps and tr.debug_nan_in == "grads" else None
  step_fn = ts.make_train_step(m.graphdef, m.abstract_params, m.tx, step_config(cfg), mesh,
                               model_cfg, accum_steps=accum, grad_hook=hook)

  def wrapped(state, batch, key, itm):
    new, metrics = step_fn(state, batch, key, itm)
    metrics = dict(metrics, nonfinite_run=new["nonfinite_run"],
                   nonfinite_total=new["nonfinite_total"])
    return new, metrics

  replicated = NamedSharding(mesh, P())
  sharded: list[step_jit.ShardedStep] = []  # built at the first batch (its tree structure)
  compiled: dict[bool, object] = {}

  def run_step(state, batch, key, itm):
    if itm not in compiled:
      if not sharded:  # the mesh is ambient while tracing: activation constraints apply
        sharded.append(step_jit.ShardedStep(wrapped, mesh, m.state_shardings,
                                            step_jit.batch_shardings(batch, mesh, accum)))
      t0 = time.time()
      compiled[itm] = sharded[0].lower(state, batch, key, itm).compile()
      writer.log(f"compiled the step (itm={itm}) in {time.time() - t0:.1f} s")
    return compiled[itm](state, batch, key)

  stack_fn: list = []  # accum > 1: A global micro-batches -> one [A, B, ...] batch

  def next_batch(step):
    """The step's global batch (its accum micro-batches stacked) and its aux choice."""
    micro = []
    for i in range(accum):
      local, choice = streams.next(step)  # the aux coin depends on the step only
      if tr.log_example_ids:
        with ids_path.open("a") as f:
          f.write(json.dumps({"step": step, "micro": i, "ids": train_data.example_ids(local),
                              "aux": choice}) + "\n")
      if step in nan_steps and tr.debug_nan_in == "data" and i == 0:
        _poison(local)
      micro.append(global_batch.to_global(local, mesh))
    if accum == 1:
      return micro[0], choice
    if not stack_fn:  # the batch axis stays sharded as in every micro-batch (now axis 1)
      stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((accum,) + x.shape, x.dtype),
                             micro[0])
      stack_fn.append(jax.jit(lambda *mb: jax.tree.map(lambda *a: jnp.stack(a), *mb),
                              out_shardings=step_jit.batch_shardings(stacked, mesh, accum)))
    return stack_fn[0](*micro), choice

  examples_per_step = {k: int(cfg.batch[k]) for k in streams.kinds}  # global, per step
  progress = metrics_writer.Progress(total_steps, examples_per_step, start_step=start_step)
  window = _MetricsWindow()
  watcher = preemption.PreemptionWatcher()
  max_bad = int(tr.max_consecutive_nonfinite)
  peak = float(tr.peak_tflops) * 1e12
  pending = None  # (step number after the update, device metrics)
  status, step = "done", start_step
  image_aux = F.IMAGE in streams.aux_prob

  def process(pending_item):
    """Reads one finished step's metrics: non-finite check, logging."""
    done_step, dev_metrics = pending_item
    host = jax.device_get(dev_metrics)
    bad = int(host.pop("nonfinite_run"))
    total_bad = int(host.pop("nonfinite_total"))
    if bad >= max_bad > 0:
      raise NonFiniteError(
          f"{bad} consecutive non-finite updates (last at step {done_step - 1}; "
          f"{total_bad} in total): stopping without saving; the last checkpoint "
          f"({manager.latest_step()}) is intact")
    window.add({k: v for k, v in host.items()})
    if done_step % int(tr.log_every) == 0 or done_step == total_steps:
      avg = window.pop()
      mfu = None
      # Analytic FLOPs of the global step per device (XLA's cost analysis counts a scanned layer
      # once); the ITM variant is the larger one.
      flops = (flops_lib.step_flops(model_cfg, sizes, itm=any(compiled)) * accum * pc
               / jax.device_count())
      if peak and flops:
        mfu = flops * progress_rate() / peak
      line = progress.update(done_step, _progress_metrics(avg), mfu=mfu)
      scalars = {f"train/{k}": v for k, v in avg.items()}
      scalars["train/nonfinite_total"] = total_bad
      scalars["train/lr"] = float(optim.lr_schedule(optim_config(cfg))(done_step - 1))
      for k, v in streams.skip_counts().items():
        scalars[f"data/skipped/{k}"] = v
      writer.write_scalars(done_step, scalars)
      writer.log(line)

  last_times = []

  def progress_rate():
    if len(last_times) < 2:
      return 0.0
    return (len(last_times) - 1) / max(last_times[-1] - last_times[0], 1e-9)

  last_saved = [start_step if restored is not None else None]

  # The base key's data as a replicated global array (a single-device array cannot be saved
  # by several processes).
  rng_data = jax.jit(lambda: jax.random.key_data(base_key), out_shardings=replicated)()

  def save(at_step, force=False):
    last_saved[0] = at_step
    manager.save(at_step, {"train": state, "rng": rng_data},
                 data_iter=train_data.gather_process_states(streams.get_state()),
                 config=config_json, force=force)

  try:
    writer.log(f"start at step {start_step} of {total_steps} (set-up {time.time() - t_start:.1f} s)")
    while step < total_steps:
      if watcher.should_stop(step):
        if pending is not None:
          process(pending)
          pending = None
        logging.warning("preemption notice: saving step %d and exiting (process %d)", step, pi)
        if last_saved[0] != step:
          save(step, force=True)
        manager.wait_until_finished()
        status = "preempted"
        break
      if profile and step == profile[0]:
        jax.profiler.start_trace(str(workdir / "profile"))
      batch, choice = next_batch(step)
      itm = itm_for_step(cfg, step, choice, image_aux)
      key = jax.random.fold_in(base_key, step)
      state, metrics = run_step(state, batch, key, itm)
      step += 1
      if pending is not None:
        process(pending)
      pending = (step, metrics)
      last_times.append(time.monotonic())
      last_times[:] = last_times[-int(tr.log_every) - 1:]
      if profile and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
      at_end = step == total_steps or step == stop_after
      if step % int(tr.ckpt_every) == 0 or at_end:
        process(pending)  # never save a state whose non-finite count is unchecked
        pending = None
        save(step, force=at_end)
      if int(tr.eval_every) and step % int(tr.eval_every) == 0 and len(cfg.eval.evaluators):
        _evaluate(cfg, m, state, mesh, tokenizer, step, writer, workdir)
      if step == stop_after:
        status = "stopped"
        break
    if pending is not None:
      process(pending)
      pending = None
    manager.wait_until_finished()
    if status == "done" and tr.export_at_end:
      _export(workdir, model_cfg, state["params"], writer)
    writer.log(f"finished ({status}) at step {step}; {time.time() - t_start:.1f} s")
  finally:
    watcher.close()
    streams.close()
    manager.close()
    writer.close()
    py_logging.getLogger().removeHandler(log_handler)
    log_handler.close()
  return RunResult(status, step, str(workdir))


def _evaluate(cfg, m: _Model, state, mesh, tokenizer, step: int, writer, workdir) -> None:
  """Runs the configured evaluators through `x2vlm_jax.evaluators.run.evaluate`."""
  from x2vlm_jax.evaluators import run as eval_run  # pylint: disable=g-import-not-at-top

  model_state = jax.tree.map(lambda x: x, m.abstract_params)
  nnx.replace_by_pure_dict(model_state, state["params"])
  model = nnx.merge(m.graphdef, model_state)
  results = eval_run.evaluate(model, cfg.eval, tokenizer, mesh, step=step,
                              png_path=str(workdir / f"grounding_{step}.png"), log=writer.log)
  writer.write_scalars(step, results)
  writer.log(f"step {step}: " + eval_run.format_metrics(results))
