"""The training loop: everything `train.py` does after parsing flags.

`train_and_evaluate(config, workdir)`:
  1. `_Run.start`: the mesh, the typed configs (`run_config`), and the train state: resumed from
     the newest good checkpoint in `workdir/checkpoints` (config change check, data-iterator
     state of every stream and process) or initialised from the configured weights (`init_lib`)
     with a fresh optimizer; the data streams; the jitted step of the config's task
     (`tasks.py`, `step_jit.task_step`; ITM and no-ITM variants compiled on first use);
  2. the loop: preemption check, the step's batch (`train_batches`: made one step ahead on a
     background thread), the step, metrics read one step
     late (`train_report.Reporter`), then checkpoint / evaluation and model selection
     (`train_eval.py`) / profiling when due;
  3. the export of the final weights (`export.py`).

Exactness: the step key is fold_in(key(seed), step) and data positions are checkpointed, so a
run resumed from step s reproduces the uninterrupted run bit for bit from s on.
"""

from __future__ import annotations

import dataclasses
import json
import logging as py_logging
import os
import time

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import features as F
from data_pipelines.text_ops import Tokenizer
from x2vlm_jax import checkpoint as ckpt_lib
from x2vlm_jax import (
  export,
  init_lib,
  metrics_writer,
  optim,
  paths,
  preemption,
  run_env,
  sharding,
  step_jit,
  train_batches,
  train_data,
  train_eval,
  train_report,
)
from x2vlm_jax import flops as flops_lib
from x2vlm_jax import run_config as rc
from x2vlm_jax.train_report import NonFiniteError
from x2vlm_jax.train_state import TrainStateSpec

CKPT_DIR = ckpt_lib.CKPT_DIR
EXAMPLE_IDS = "example_ids.p{}.jsonl"

__all__ = ["NonFiniteError", "RunResult", "train_and_evaluate", "itm_for_step", "CKPT_DIR"]


@dataclasses.dataclass
class RunResult:
  """How `train_and_evaluate` ended: 'done', 'preempted' or 'stopped' (train.stop_after)."""

  status: str
  step: int
  workdir: str


def itm_for_step(loop: rc.LoopConfig, step: int, aux_choice, image_aux: bool) -> bool:
  """Whether `step` computes ITM: loss.itm, only before loss.stop_calc_itm (-1 = always), and
  with an aux image stream (1B stage 1) only on steps that drew the clean aux image batch --
  for every kind of that step, regions included (docs/fidelity.md#itm-gating)."""
  itm = loop.itm and (loop.stop_calc_itm < 0 or step < loop.stop_calc_itm)
  if image_aux:
    itm = itm and bool(aux_choice.get(F.IMAGE, False))
  return itm


@dataclasses.dataclass
class _Run:
  """One run's set-up: configs, mesh, state, data and the jitted step."""

  cfg: object
  loop: rc.LoopConfig
  workdir: paths.epath.Path
  mesh: object
  model_cfg: object
  sizes: F.BatchSizes
  spec: TrainStateSpec
  state: dict
  start_step: int
  resumed: bool
  config_json: dict
  data_state: dict | None = None  # the restored data-iterator states of every process
  tokenizer: Tokenizer | None = None
  streams: train_data.DataStreams | None = None

  @property
  def task(self):
    """The run's task (`tasks.Task`)."""
    return rc.task(self.cfg)

  @classmethod
  def start(
    cls,
    cfg,
    workdir: paths.epath.Path,
    manager: ckpt_lib.CheckpointManager,
    writer: metrics_writer.MetricsWriter,
    loop: rc.LoopConfig,
    allow_config_change: bool,
  ) -> _Run:
    """Resumes from the newest good checkpoint, or initialises the configured weights."""
    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    model_cfg = rc.model_config(cfg)
    sizes = rc.batch_sizes(cfg, model_cfg, mesh, jax.process_count(), loop.accum_steps)
    logging.info(
      "process %d/%d, %d devices, mesh %s; per-process batch sizes %s",
      jax.process_index(),
      jax.process_count(),
      jax.device_count(),
      dict(mesh.shape),
      sizes,
    )
    config_json = rc.run_json(cfg, model_cfg)
    args = (cfg, loop, workdir, mesh, model_cfg, sizes)
    if manager.latest_step() is None:
      moved = manager.moved_aside()
      if moved:  # never start over silently where every checkpoint was rejected
        raise ckpt_lib.CheckpointError(
          f"{workdir / CKPT_DIR} has no good checkpoint; rejected steps were moved aside "
          f"({', '.join(moved)}): move them out of the directory to start from step 0"
        )
      return cls._initialise(*args, config_json)
    specs = []

    def target(saved: dict) -> dict:  # after the step's files and config were checked
      fresh = tuple(saved.get("_fresh_paths", ()))
      specs.append(TrainStateSpec.build(model_cfg, rc.optim_config(cfg), mesh, fresh))
      return specs[-1].checkpoint_target()

    restored = manager.restore(
      target, check_config=rc.resume_check(config_json, allow_config_change)
    )
    saved_rng = np.asarray(restored.state["rng"].addressable_data(0))
    if not np.array_equal(saved_rng, np.asarray(jax.random.key_data(_base_key(loop)))):
      raise ckpt_lib.ConfigChangedError("the checkpoint's PRNG key differs from key(train.seed)")
    for why in restored.skipped:
      writer.log(f"checkpoint: rejected newer step: {why}")
    for warning in restored.warnings:
      writer.log(f"warning on resume: {warning}")
    writer.log(f"resumed from step {restored.step} ({workdir / CKPT_DIR})")
    return cls(
      *args,
      specs[-1],
      restored.state["train"],
      int(restored.step),
      True,
      config_json,
      restored.data_iter,
    )

  @classmethod
  def _initialise(cls, cfg, loop, workdir, mesh, model_cfg, sizes, config_json) -> _Run:
    # Initializers draw from an 'unsafe_rbg' key: its init program compiles much faster on CPU
    # than threefry's, and initial values need no cross-platform reproducibility.
    init_key = jax.random.key(loop.seed, impl="unsafe_rbg")
    init = init_lib.initialize(rc.init_config(cfg), model_cfg, mesh, init_key)
    spec = TrainStateSpec.build(model_cfg, rc.optim_config(cfg), mesh, init.fresh_paths)
    params = nnx.to_pure_dict(nnx.state(init.model, nnx.Param))
    del init
    return cls(
      cfg, loop, workdir, mesh, model_cfg, sizes, spec, spec.create(params), 0, False, config_json
    )

  def open_streams(self, allow_config_change: bool) -> None:
    """The tokenizer and data streams, positioned where the checkpoint left them (MVPTR: its
    pre-tokenised region-feature stream, `train_data.MvptrStreams`)."""
    where = (self.loop.seed, jax.process_index(), jax.process_count())
    if rc.family(self.cfg) == "mvptr":
      mvptr_cfg = rc.mvptr_rc.streams_config(self.cfg, self.model_cfg, self.sizes)
      self.streams = train_data.MvptrStreams(mvptr_cfg, *where)
    else:
      self.tokenizer = Tokenizer(rc.tokenizer_dir(self.cfg), int(self.cfg.data.max_tokens))
      preproc = rc.preproc_config(self.cfg, self.model_cfg)
      self.streams = train_data.DataStreams(
        rc.streams_config(self.cfg), self.sizes, preproc, self.tokenizer, *where
      )
    saved = self.data_state
    if saved is None:
      return
    pc, mine = len(saved), saved.get(f"process_{jax.process_index()}")
    if pc == jax.process_count() and mine is not None:
      self.streams.set_state(mine)
      return
    msg = f"the checkpoint holds data state for {pc} processes, this run has {jax.process_count()}"
    if not allow_config_change:
      raise ckpt_lib.ConfigChangedError(
        msg + "; pass --allow_config_change to restart the data streams from their beginning"
      )
    logging.warning("%s: data streams restart from their beginning", msg)


def _base_key(loop: rc.LoopConfig) -> jax.Array:
  return jax.random.key(loop.seed)


def _write_reports(run: _Run, writer: metrics_writer.MetricsWriter) -> None:
  """Parameter overview, sharding report and optimizer groups (process 0)."""
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top

  spec = run.spec
  overview = parameter_overview.get_parameter_overview(
    nnx.to_pure_dict(spec.abstract_params), include_stats=False
  )
  report = "\n".join(
    [
      "parameter overview:\n" + overview,
      "sharding report:\n" + sharding.sharding_report(spec.abstract_params, run.mesh),
      "parameter groups:\n"
      + optim.param_groups_report(spec.abstract_params, spec.fresh_paths, rc.optim_config(run.cfg)),
    ]
  )
  (run.workdir / "reports.txt").write_text(report + "\n")
  logging.info("%s", report)
  writer.write_text(
    run.start_step, "config", "```\n" + json.dumps(run.config_json, indent=1) + "\n```"
  )


class _Saver:
  """Saves {state, base key} + data positions + config; remembers the last saved step."""

  def __init__(
    self, manager: ckpt_lib.CheckpointManager, run: _Run, logdir: paths.LogDir, data_state
  ):
    # data_state: () -> the streams' positions after the last batch consumed by a step
    self.manager, self.run, self.logdir, self.data_state = manager, run, logdir, data_state
    self.last_saved = run.start_step if run.resumed else None
    # The base key's data as a replicated global array (a single-device array cannot be saved
    # by several processes).
    replicated = NamedSharding(run.mesh, P())
    self.rng_data = jax.jit(
      lambda: jax.random.key_data(_base_key(run.loop)), out_shardings=replicated
    )()

  def save(self, step: int, state: dict, force: bool = False) -> float:
    """Saves `step`; logs and returns the seconds the loop was blocked."""
    t0 = time.monotonic()
    self.last_saved = step
    data_iter = train_data.gather_process_states(self.data_state())
    self.manager.save(
      step,
      self.run.spec.checkpoint_item(state, self.rng_data),
      data_iter=data_iter,
      config=self.run.config_json,
      force=force,
    )
    self.logdir.sync()  # a cloud workdir gets the logs up to this checkpoint
    seconds = time.monotonic() - t0
    background = " (files still being written in the background)" if self.manager.async_save else ""
    logging.info("checkpoint: step %d saved in %.1f s%s", step, seconds, background)
    return seconds


def _periodic_eval(run: _Run, writer) -> train_eval.PeriodicEval:
  return train_eval.PeriodicEval(
    train_eval.run_eval_config(run.cfg, run.model_cfg),
    run.spec.model,
    run.tokenizer,
    run.mesh,
    run.workdir,
    writer,
    run.model_cfg,
    run.loop.select_metric,
    run.loop.select_mode,
  )


def _reporter(run: _Run, writer, manager, jstep: step_jit.JittedStep) -> train_report.Reporter:
  loop, optim_cfg = run.loop, rc.optim_config(run.cfg)
  lr = optim.lr_schedule(optim_cfg)
  # Analytic FLOPs of the global step per device (XLA's cost analysis counts a scanned layer
  # once); the ITM variant is the larger one. Not counted for MVPTR (0 = unknown).
  flops = lambda: float(
    rc.family(run.cfg) == "x2vlm"
    and flops_lib.step_flops(
      run.model_cfg, run.sizes, itm=any(jstep.compiled_variants), objectives=run.task.objectives
    )
    * loop.accum_steps
    * jax.process_count()
    / jax.device_count()
  )
  return train_report.Reporter(
    writer,
    loop,
    {k: int(run.cfg.batch[k]) for k in run.streams.kinds},
    run.start_step,
    flops_per_device=flops,
    lr=lambda s: float(lr(s)),
    skip_counts=run.streams.skip_counts,
    latest_checkpoint=manager.latest_intact_step,
  )


def train_and_evaluate(
  config, workdir: str | os.PathLike, *, allow_config_change: bool = False, profile_steps: str = ""
) -> RunResult:
  """Runs (or resumes) training as configured; see the module docstring.

  Raises:
    NonFiniteError: `train.max_consecutive_nonfinite` consecutive updates were skipped.
    checkpoint.ConfigChangedError: a critical setting differs from the checkpoint.
  """
  workdir = paths.path(workdir)  # keeps gs://... intact (pathlib would collapse the //)
  if paths.is_remote(workdir) and not str(workdir).startswith("gs://"):
    raise ValueError(f"--workdir={workdir}: checkpoints go to a local folder or gs:// only")
  workdir.mkdir(parents=True, exist_ok=True)
  # The logs this process continues on a resume (copied down from a cloud workdir).
  logs = (run_env.log_name(), EXAMPLE_IDS.format(jax.process_index()))
  logdir = paths.LogDir(workdir, logs + (metrics_writer.JSONL_NAME,) * (jax.process_index() == 0))
  log_handler = run_env.setup_logging(logdir.local)
  t_start = time.time()
  loop = rc.loop_config(config, profile_steps)
  run_env.enable_compilation_cache(loop.compilation_cache_dir)
  # Log lines only until the logs are trimmed to the start step (`train_report.restart_logs`).
  writer = metrics_writer.MetricsWriter(logdir.local, tensorboard=False)
  manager = ckpt_lib.CheckpointManager(
    workdir / CKPT_DIR,
    max_to_keep=loop.keep,
    keep_every=loop.keep_every or None,
    async_save=loop.async_checkpoint,
  )
  watcher = preemption.PreemptionWatcher()
  run = None
  try:
    run = _Run.start(config, workdir, manager, writer, loop, allow_config_change)
    run.config_json["_fresh_paths"] = list(run.spec.fresh_paths)
    run.open_streams(allow_config_change)
    writer.close()
    ids_log = logdir.local / EXAMPLE_IDS.format(jax.process_index())
    writer = train_report.restart_logs(logdir.local, run.start_step, run.resumed, ids_log)
    if jax.process_index() == 0:
      _write_reports(run, writer)
    writer.log(
      f"start at step {run.start_step} of {loop.total_steps} (set-up {time.time() - t_start:.1f} s)"
    )
    status, step = _loop(run, manager, writer, watcher, logdir)
    if status == "done" and loop.export_at_end:
      export.export_params(workdir, run.model_cfg, run.state["params"], writer.log)
    writer.log(f"finished ({status}) at step {step}; {time.time() - t_start:.1f} s")
  finally:
    watcher.close()
    if run is not None and run.streams is not None:
      run.streams.close()
    manager.close()
    writer.close()
    py_logging.getLogger().removeHandler(log_handler)
    log_handler.close()
    logdir.close()
  return RunResult(status, step, str(workdir))


def _loop(run: _Run, manager, writer, watcher, logdir: paths.LogDir) -> tuple[str, int]:
  """Steps from run.start_step until the end, a stop or a preemption: (status, step)."""
  loop = run.loop
  reporter = None

  def compiled(itm: bool, seconds: float) -> None:
    writer.log(f"compiled the step (itm={itm}) in {seconds:.1f} s")
    if reporter is not None:  # compile time is not step time (rates, ETA)
      reporter.pause("compile", seconds)

  jstep = step_jit.task_step(
    run.spec,
    run.task,
    rc.step_config(run.cfg),
    loop.accum_steps,
    compiler_options=step_jit.compile_options(loop.fast_compile),
    on_compile=compiled,
  )
  ids_path = logdir.local / EXAMPLE_IDS.format(jax.process_index())
  ids_path = ids_path if loop.log_example_ids else None
  end = loop.total_steps if loop.stop_after < 0 else min(loop.total_steps, loop.stop_after)
  batches = train_batches.StepBatches(run.streams, run.mesh, loop.accum_steps, ids_path, end)
  reporter = _reporter(run, writer, manager, jstep)
  try:
    return _steps(run, manager, writer, watcher, logdir, jstep, batches, reporter)
  finally:
    batches.close()  # before the streams close (train_and_evaluate)


def _steps(run: _Run, manager, writer, watcher, logdir, jstep, batches, reporter):
  """The loop proper of `_loop`: (status, step)."""
  loop = run.loop
  saver = _Saver(manager, run, logdir, batches.data_state)
  evaluation = _periodic_eval(run, writer)
  base_key, image_aux = _base_key(loop), F.IMAGE in run.streams.aux_prob
  profile, step = loop.profile_steps, run.start_step
  while step < loop.total_steps:
    if watcher.should_stop(step):
      reporter.flush()
      logging.warning(
        "preemption notice: saving step %d and exiting (process %d)", step, jax.process_index()
      )
      if saver.last_saved != step:
        saver.save(step, run.state, force=True)
      manager.wait_until_finished()
      return "preempted", step
    if profile and step == profile[0]:
      jax.profiler.start_trace(str(run.workdir / "profile"))
    batch, choice = batches.next(step)
    itm = itm_for_step(loop, step, choice, image_aux)
    run.state, metrics = jstep(run.state, batch, jax.random.fold_in(base_key, step), itm)
    step += 1
    reporter.step_done(step, metrics)
    if profile and step == profile[1]:
      jax.block_until_ready(run.state)
      jax.profiler.stop_trace()
    at_end = step in (loop.total_steps, loop.stop_after)
    if step % loop.ckpt_every == 0 or at_end:
      reporter.flush()  # never save a state whose non-finite count is unchecked
      reporter.pause("checkpoint", saver.save(step, run.state, force=at_end))
    if loop.eval_every and step % loop.eval_every == 0 and evaluation.enabled:
      t0 = time.monotonic()
      evaluation.run(run.state["params"], step)
      reporter.pause("eval", time.monotonic() - t0)
    if step == loop.stop_after:
      reporter.flush()
      manager.wait_until_finished()
      return "stopped", step
  reporter.flush()
  manager.wait_until_finished()
  return "done", step
