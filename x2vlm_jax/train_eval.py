"""Evaluation during training, and model selection.

`PeriodicEval.run(params, step)` runs the configured evaluators (`evaluators/run.py`) on the
current parameters, writes their metrics to TensorBoard / metrics.jsonl and a summary line to
the log. With `train.select_metric` set (e.g. 'eval/retrieval/val/r_mean'), every evaluation
whose value of that metric beats the best so far (`train.select_mode` 'max' or 'min') writes the
parameters to `<workdir>/best/params_<step>` (a params directory, loadable by `eval.py
--checkpoint` and as `init.params_dir`) and records it in `<workdir>/best/best.json`; the older
best is removed. Select on a validation split: the official fine-tuning scripts select on the
test split, which a config reproduces only by naming the test metric
(docs/finetuning.md#model-selection).
"""

from __future__ import annotations

import dataclasses
import json

import jax
from etils import epath

from x2vlm_jax import metrics_writer, params_io
from x2vlm_jax import run_config as rc
from x2vlm_jax.evaluators import run as eval_run
from x2vlm_jax.evaluators.settings import EvalConfig
from x2vlm_jax.models.config import ModelConfig

BEST_DIR = "best"
BEST_JSON = "best.json"


def run_eval_config(cfg, model_cfg) -> EvalConfig:
  """The evaluation of a training run: `run_config.eval_config(cfg.eval)`; an MVPTR run's
  evaluators also get the example lengths and tokenizer of its `data` section."""
  eval_cfg = rc.eval_config(cfg.eval)
  if rc.family(cfg) == "mvptr":
    eval_cfg = dataclasses.replace(eval_cfg, mvptr_inputs=rc.mvptr_rc.eval_inputs(cfg, model_cfg))
  return eval_cfg


class PeriodicEval:
  """Runs the evaluators and keeps the best parameters (see the module docstring)."""

  def __init__(
    self,
    eval_cfg: EvalConfig,
    model_fn,
    tokenizer,
    mesh,
    workdir: epath.Path,
    writer: metrics_writer.MetricsWriter,
    model_cfg: ModelConfig,
    select_metric: str = "",
    select_mode: str = "max",
  ):
    self.eval_cfg, self.model_fn, self.tokenizer, self.mesh = eval_cfg, model_fn, tokenizer, mesh
    self.workdir, self.writer, self.model_cfg = workdir, writer, model_cfg
    self.metric, self.mode = select_metric, select_mode
    self.best = self._read_best()

  @property
  def enabled(self) -> bool:
    return bool(self.eval_cfg.names)

  def _read_best(self) -> dict | None:
    path = self.workdir / BEST_DIR / BEST_JSON
    if not self.metric or not path.exists():
      return None
    best = json.loads(path.read_text())
    if best.get("metric") != self.metric or best.get("mode") != self.mode:
      raise ValueError(
        f"{path} selects on {best.get('metric')!r} ({best.get('mode')}); this run "
        f"selects on {self.metric!r} ({self.mode}): move the old best aside"
      )
    return best

  def run(self, params: dict, step: int) -> dict[str, float]:
    """Evaluates `params` (the state's parameters) at `step`; returns the metrics."""
    results = eval_run.evaluate(
      self.model_fn(params),
      self.eval_cfg,
      self.tokenizer,
      self.mesh,
      step=step,
      png_path=str(self.workdir / f"grounding_{step}.png"),
      log=self.writer.log,
      result_dir=str(self.workdir / f"results_{step}"),
    )
    self.writer.write_scalars(step, results)
    self.writer.log(f"step {step}: " + eval_run.format_metrics(results))
    if self.metric:
      self._select(params, step, results)
    return results

  def _better(self, value: float) -> bool:
    if self.best is None:
      return True
    return value > self.best["value"] if self.mode == "max" else value < self.best["value"]

  def _select(self, params: dict, step: int, results: dict) -> None:
    if self.metric not in results:
      raise ValueError(
        f"config.train.select_metric = {self.metric!r} is not among the "
        f"evaluation metrics: {sorted(k for k in results if k.startswith('eval/'))}"
      )
    value = float(results[self.metric])
    if not self._better(value):
      return
    best_dir = self.workdir / BEST_DIR
    name = f"params_{step}"
    if jax.process_index() == 0 and (best_dir / name).exists():
      (best_dir / name).rmtree()  # left by a run that stopped before recording it
    params_io.save_params(best_dir / name, self.model_cfg, params)  # collective
    old, self.best = (
      self.best,
      {"metric": self.metric, "mode": self.mode, "value": value, "step": step, "dir": name},
    )
    if jax.process_index() == 0:
      tmp = best_dir / (BEST_JSON + ".tmp")
      tmp.write_text(json.dumps(self.best, indent=1) + "\n")
      tmp.replace(best_dir / BEST_JSON)  # atomic: best.json always names a complete directory
      if old is not None and old["dir"] != name:
        if (best_dir / old["dir"]).exists():
          (best_dir / old["dir"]).rmtree()
    self.writer.log(f"step {step}: new best {self.metric} = {value:.4f} -> {best_dir / name}")
