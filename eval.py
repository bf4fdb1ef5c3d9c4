"""Evaluation entry point (thin): flags -> model weights -> x2vlm_jax.evaluators.run -> JSON.

  python eval.py --config=configs/demo.py --checkpoint=/tmp/demo/run
  python eval.py --config=configs/demo.py --checkpoint=/tmp/demo/run/export/params
  python eval.py --config=configs/pretrain_base_4m.py --official_th=x2vlm_base_4m.th \
      --config.eval.evaluators=retrieval --config.eval.retrieval.data=json:/data/coco_test.json

The config is the same file the run was trained with (its `model`, `data.tokenizer`,
`data.max_tokens` and `eval` sections are used). The metrics are printed as one JSON object on
stdout (and written to --output); with --png a picture of predicted vs true grounding boxes is
written. See docs/evaluation.md.
"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (as for train.py).", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint",
  "",
  "A training workdir, its checkpoints/ directory, or a params directory (params_io).",
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest good one).")
_OFFICIAL = flags.DEFINE_string("official_th", "", "An official X2-VLM .th (or .safetensors).")
_OUTPUT = flags.DEFINE_string("output", "", "Also write the metrics JSON to this file.")
_PNG = flags.DEFINE_string("png", "", "Write predicted vs true grounding boxes to this PNG.")
_RESULTS = flags.DEFINE_string("results", "", "Write result files (VQA answers) to this directory.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from absl import logging  # pylint: disable=g-import-not-at-top

  from data_pipelines.text_ops import Tokenizer  # pylint: disable=g-import-not-at-top
  from x2vlm_jax import cpu_host, paths, run_config, run_env, sharding  # pylint: disable=g-import-not-at-top
  from x2vlm_jax.evaluators import run, weights  # pylint: disable=g-import-not-at-top

  run_env.quiet_orbax()  # orbax's INFO lines would bury the result
  cfg = _CONFIG.value
  eval_cfg = run_config.eval_config(cfg.eval)
  if not eval_cfg.names:  # checked before any weights are read
    print(
      "eval.py: the config runs no evaluator: set config.eval.evaluators and its section's "
      "data, e.g. --config.eval.evaluators=retrieval "
      "--config.eval.retrieval.data=json:/data/coco_test.json (docs/evaluation.md)",
      file=sys.stderr,
    )
    sys.exit(2)
  # Before anything touches a device: on CPU, the encoder and ITM calls stop re-faulting their
  # temporary memory (cpu_host; the same setting as train.py's).
  cpu_host.setup(bool((cfg.get("train") or {}).get("cpu_host_tuning", True)))
  mesh = sharding.make_mesh(cfg.mesh.to_dict())
  model, source = weights.load_model(
    run_config.model_config(cfg),
    mesh,
    checkpoint=_CHECKPOINT.value,
    official_th=_OFFICIAL.value,
    step=_STEP.value,
  )
  logging.info("evaluating %s", source)
  tokenizer = Tokenizer(run_config.tokenizer_dir(cfg), int(cfg.data.max_tokens))
  metrics = run.evaluate(
    model,
    eval_cfg,
    tokenizer,
    mesh,
    png_path=_PNG.value or None,
    log=lambda s: logging.info("%s", s),
    result_dir=_RESULTS.value or None,
  )
  text = json.dumps(metrics, indent=1, sort_keys=True)
  if _OUTPUT.value:  # epath: --output=gs://... is written to the bucket
    paths.path(_OUTPUT.value).write_text(text + "\n")
  print(text)
  logging.info("%s", run.format_metrics(metrics))


if __name__ == "__main__":
  from x2vlm_jax import cli  # light: absl only (jax is imported after the flags are read)

  app.run(main, flags_parser=cli.parse_flags)
