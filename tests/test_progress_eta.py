"""An honest progress line: compile, checkpoint and evaluation time stay out of the rates, the
recurring ones are amortised into the ETA, the line says where a window's time went; and on a
real tiny run the ETA given right after the compile is within 20 % of the time that remained."""

import time

import pytest
import tiny_launch

from x2vlm_jax import metrics_writer as mw
from x2vlm_jax import train_lib


def test_pauses_leave_rates_and_eta_steady():
  now = [0.0]
  prog = mw.Progress(total_steps=100, examples_per_step={"image": 10}, clock=lambda: now[0])
  now[0] += 30.0 + 10 * 0.5  # compile 30 s, then 10 steps of 0.5 s
  prog.pause("compile", 30.0)
  line = prog.update(10)
  # 10 steps in 5 s of steps: 20 img/s; 90 steps left at 0.5 s = 45 s (compile not repeated)
  assert "ex/s image 20.0" in line and "ETA 0:00:45" in line
  assert line.endswith(" | paused compile 30.0 s")
  now[0] += 4.0 + 10 * 0.5  # a 4 s checkpoint save, 10 more steps
  prog.pause("checkpoint", 4.0)
  line = prog.update(20)
  # rate still 20 img/s; ETA: 80 x (10 s of steps + 4 s of saves) / 20 steps = 56 s
  assert "ex/s image 20.0" in line and "ETA 0:00:56" in line
  assert line.endswith(" | paused checkpoint 4.0 s")
  now[0] += 5.0
  assert not prog.update(30).endswith(" s")  # a window without pauses says nothing
  assert prog.steps_per_sec() == pytest.approx(2.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """Tiny for 32 steps with every ETA the progress lines gave and when they were given."""
  seen = []
  real = mw.format_progress

  def spy(step, total, metrics=None, **kw):
    seen.append((step, time.monotonic(), kw.get("eta_seconds")))
    return real(step, total, metrics, **kw)

  mp = pytest.MonkeyPatch()
  mp.setattr(mw, "format_progress", spy)
  c = tiny_launch.config(tmp_path_factory, 32, log_every=8, ckpt_every=1000)
  try:
    result = train_lib.train_and_evaluate(c, tmp_path_factory.mktemp("eta"))
  finally:
    mp.undo()
  return result, seen


def test_eta_after_compile_is_within_20_percent(tiny_run):
  """The first line whose window had no compilation (step 16: the window 8-16) predicts the
  rest of the run (16 steps) within 20 %; the compile window's own ETA is printed too."""
  result, seen = tiny_run
  assert result.status == "done" and [s for s, _, _ in seen] == [8, 16, 24, 32]
  t_end = seen[-1][1]
  for step, t, eta in seen[:2]:
    print(f"ETA at step {step}: {eta:.2f} s, real remaining {t_end - t:.2f} s")
  _, t16, eta16 = seen[1]
  assert eta16 == pytest.approx(t_end - t16, rel=0.2)
