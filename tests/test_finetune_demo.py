"""The fine-tuning demo's CI variant: the pre-training demo's CI model (the session's `demo_ci`
run) fine-tuned on synthetic retrieval in the official format, evaluated on held-out images
before and after: fine-tuning must beat the pre-trained model (mean recall, the metric the
retrieval configs select on)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_fine_tuning_beats_the_pretrained_model(demo_ci, tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # as the demo runs on a user's machine (see tests/conftest.py)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "x2vlm_jax.finetune_demo",
      "--ci",
      "--tasks=retrieval",
      f"--pretrained={demo_ci['_work'] / 'run'}",
      f"--workdir={tmp_path}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=1500,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  res = summary["retrieval"]
  zero, tuned = res["zero_shot"], res["fine_tuned"]
  key = "eval/retrieval/test/r_mean"
  print(
    f"retrieval mean recall: zero-shot {zero[key]:.1f} -> fine-tuned {tuned[key]:.1f}; "
    f"R@1 t->i {zero['eval/retrieval/test/img_r1']:.1f} -> "
    f"{tuned['eval/retrieval/test/img_r1']:.1f}; {res['seconds']}"
  )
  assert tuned[key] > zero[key] + 2.0, (zero[key], tuned[key])
  first, last = res["losses"]["train/loss/total"]
  assert last < first
  assert "retrieval: zero-shot -> fine-tuned" in proc.stdout
