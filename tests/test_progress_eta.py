"""An honest progress line: compile, checkpoint and evaluation time stay out of the rates, the
recurring ones are amortised into the ETA, the line says where a window's time went (the ETA
on a real tiny run: tests/test_launch_run.py)."""

import pytest

from x2vlm_jax import metrics_writer as mw


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


def test_window_after_compile_is_warm_up():
  """The steps after a compile consume the batches prefetched meanwhile: measured on tiny, that
  window ran 20-25 % faster than the rest, and an ETA from it came out 10-17 % short."""
  now = [0.0]
  prog = mw.Progress(total_steps=40, examples_per_step={"image": 10}, clock=lambda: now[0])
  now[0] += 20.0 + 10 * 0.5  # compile, 10 steps
  prog.pause("compile", 20.0)
  prog.update(10)
  now[0] += 10 * 0.3  # 10 fast steps on the prefetched batches
  line = prog.update(20)
  assert "ex/s image 33.3" in line and "ETA 0:00:06" in line  # only this window so far
  now[0] += 10 * 0.5  # the steady pace
  line = prog.update(30)
  assert "ETA 0:00:05" in line  # 10 steps x 0.5 s, the fast window left out
  assert prog.steps_per_sec() == pytest.approx(2.0)
