"""bench/profile_parse.py on a hand-written trace and HLO text (no jax, no compile)."""

import gzip
import importlib.util
import json
import pathlib
import sys

import pytest

_SPEC = importlib.util.spec_from_file_location(
  "bench_profile_parse",
  pathlib.Path(__file__).resolve().parents[1] / "bench" / "profile_parse.py",
)
pp = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = pp  # dataclasses look their module up there
_SPEC.loader.exec_module(pp)

# The shape of XLA CPU's optimised HLO text (`compiled.as_text()`), cut down.
HLO = """HloModule jit_step, entry_computation_layout={(f32[8,16]{1,0})->f32[]}

%fused_computation.1 (param_0.1: f32[8,16], param_1.2: f32[16,16]) -> f32[8,16] {
  %param_0.1 = f32[8,16]{1,0} parameter(0)
  %param_1.2 = f32[16,16]{1,0} parameter(1)
  ROOT %dot.9 = f32[8,16]{1,0} dot(%param_0.1, %param_1.2), lhs_contracting_dims={1}
}

%fused_computation.2 (param_0.3: f32[8,16]) -> f32[8] {
  %param_0.3 = f32[8,16]{1,0} parameter(0)
  %constant.4 = f32[] constant(0)
  ROOT %reduce.5 = f32[8]{0} reduce(%param_0.3, %constant.4), dimensions={1}, to_apply=%add
}

%wrapped_bc.6 (param_0.9: f32[]) -> f32[8,16] {
  %param_0.9 = f32[] parameter(0)
  ROOT %broadcast.3 = f32[8,16]{1,0} broadcast(%param_0.9), dimensions={}
}

%body.7 (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %copy.2 = u32[] copy(%p)
  %ynn_fusion.1 = f32[8,16]{1,0} fusion(%p, %p), kind=kCustom, @DOT @YNN
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%p)
}

ENTRY %main.10 (Arg_0.1: f32[8,16]) -> f32[] {
  %Arg_0.1 = f32[8,16]{1,0} parameter(0)
  %wrapped_broadcast.6 = f32[8,16]{1,0} fusion(%r), kind=kLoop, calls=%wrapped_bc.6
  %copy.1 = f32[8,16]{1,0} copy(%wrapped_broadcast.6)
  %ynn_fusion.2 = f32[8]{0} fusion(%copy.1), kind=kCustom, @SUM @YNN
  %add_convert_fusion = u32[8,16]{1,0} fusion(%copy.1), kind=kLoop, @RNG
  %while.3 = (s32[], /*index=1*/f32[8,16]{1,0}) while(%t0), condition=%cond.8, body=%body.7
  ROOT %r = f32[] constant(0)
}
"""
_PIECES = {
  "@DOT": 'calls=%fused_computation.1, metadata={op_name="jit(step)/jvp()/dot_general"},',
  "@SUM": 'calls=%fused_computation.2, metadata={op_name="jit(step)/reduce_sum"},',
  "@RNG": "calls=%fused_computation.2, "
  + 'metadata={op_name="jit(step)/jit(_bernoulli)/jit(_uniform)/add"}',
  "@YNN": 'backend_config={"fusion_config":{"kind":"__ynn_fusion"}}',
}
for _key, _text in _PIECES.items():
  HLO = HLO.replace(_key, _text)


def _op(name, ts, dur, run, tid=1, module="jit_step"):
  args = {"hlo_module": module, "hlo_op": name, "run_id": run, "device_ordinal": "0"}
  return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}


def _run(t0, run):
  """One execution: a copy, a while whose body runs a dot and a copy, a reduce on thread 2."""
  return [
    {"ph": "X", "pid": 1, "tid": 1, "ts": t0, "dur": 100.0, "name": "ThunkExecutor::Execute"},
    _op("copy.1", t0 + 1, 4.0, run),
    {"ph": "X", "pid": 1, "tid": 1, "ts": t0 + 4, "dur": 0.5, "name": "end: copy.1"},
    _op("while.3", t0 + 10, 50.0, run),
    {"ph": "X", "pid": 1, "tid": 1, "ts": t0 + 11, "dur": 45.0, "name": "ThunkExecutor::Execute"},
    _op("ynn_fusion.1", t0 + 12, 20.0, run),
    _op("copy.2", t0 + 33, 1.0, run),
    _op("ynn_fusion.1", t0 + 35, 20.0, run),
    _op("copy.2", t0 + 56, 1.0, run),
    _op("ynn_fusion.2", t0 + 15, 30.0, run, tid=2),  # concurrent with the loop
    _op("add_convert_fusion", t0 + 70, 6.0, run),
  ]


@pytest.fixture(scope="module")
def events():
  other = [_op("add.1", 500.0, 9.0, "x", module="jit__threefry_fold_in")]
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}}]
  return meta + _run(0.0, "7") + _run(200.0, "8") + other


def test_parse_hlo_reads_opcodes_kinds_and_fused_computations():
  hlo = pp.parse_hlo(HLO)
  assert hlo["copy.1"].opcode == "copy" and hlo["copy.2"].shape == "u32[]"
  assert hlo["copy.1"].operand == "wrapped_broadcast.6"
  assert pp.category(hlo["wrapped_broadcast.6"]) == "broadcast fill"
  assert not hlo["copy.1"].in_body and hlo["copy.2"].in_body and not hlo["while.3"].in_body
  assert hlo["ynn_fusion.1"].kind == "kCustom/__ynn_fusion"
  assert hlo["ynn_fusion.1"].fused == {"parameter", "dot"}
  assert hlo["ynn_fusion.2"].root == "reduce"
  assert hlo["while.3"].opcode == "while"  # the tuple type holds spaces and a comment
  assert hlo["while.3"].shape.startswith("(s32[]")
  assert hlo["ynn_fusion.1"].source == "jit(step)/jvp()/dot_general"
  assert "dot.9" in hlo and "Arg_0.1" in hlo


def test_categories_from_hlo_and_from_names():
  hlo = pp.parse_hlo(HLO)
  assert pp.category(hlo["ynn_fusion.1"]) == "GEMM (dot)"
  assert pp.category(hlo["ynn_fusion.2"]) == "reduce"  # a library fusion that is no GEMM
  assert pp.category(hlo["add_convert_fusion"]) == "rng (random bits, dropout masks)"
  assert pp.category(hlo["while.3"]) == "while / call bookkeeping"
  by_name = {
    "wrapped_copy.4": "copy / transpose",
    "transpose_copy_fusion.2": "copy / transpose",
    "bitcast_dynamic-update-slice_fusion.3": "dynamic-slice / update (data movement)",
    "subtract_dynamic-slice_fusion": "fusion: elementwise with dynamic-slice / update",
    "dynamic-slice.5": "dynamic-slice / update (data movement)",
    "bitcast_gather_fusion": "gather / scatter",
    "wrapped_broadcast.29": "broadcast fill",
    "broadcast_add_fusion.7": "fusion: loop (elementwise)",
    "multiply_reduce_fusion": "reduce",
    "ynn_fusion.12": "GEMM (dot)",
    "dot.4": "GEMM (dot)",
    "all-reduce.1": "collectives",
    "rng-bit-generator.2": "rng (random bits, dropout masks)",
    "sort.3": "other",
  }
  for name, want in by_name.items():
    assert pp.category(pp.info_from_name(name)) == want, name


def test_exclusive_times_subtract_nested_ops_on_the_same_thread(events):
  _, ops = pp.op_events(events)
  excl, nested = pp.exclusive_times(ops)
  got = {(e["args"]["hlo_op"], e["ts"]): (x, n) for e, x, n in zip(ops, excl, nested)}
  assert got[("while.3", 10.0)] == (50.0 - 2 * 20.0 - 2 * 1.0, False)
  assert got[("ynn_fusion.1", 12.0)] == (20.0, True)
  assert got[("ynn_fusion.2", 15.0)] == (30.0, False)  # thread 2: not inside the loop


def test_summary_per_step(events):
  s = pp.summarize(events, pp.parse_hlo(HLO), top=3)
  assert s["module"] == "jit_step" and s["steps"] == 2 and s["devices"] == 1
  # per run: copy 4 + while 8 + 2 x dot 20 + 2 x copy 1 + reduce 30 + rng 6 = 90 us
  assert s["op_ms"] == pytest.approx(0.090)
  assert s["span_ms"] == pytest.approx(0.075)  # first op at +1, last ends at +76
  assert s["busy_ms"] == pytest.approx(0.060)  # +1..+5, +10..+60 (with +15..+45), +70..+76
  assert s["ops_per_step"] == 7 and s["copies_per_step"] == 3 and s["scalar_ops_per_step"] == 2
  assert s["copies_by_size"]["small"] == {"per_step": 2, "ms_per_step": 0.002}
  assert s["copies_by_size"]["of_fills"] == {"per_step": 1, "ms_per_step": 0.004}  # copy.1
  cats = {c["category"]: c for c in s["categories"]}
  assert cats["GEMM (dot)"]["ms_per_step"] == pytest.approx(0.040)
  assert cats["GEMM (dot)"]["ms_per_step_in_loops"] == pytest.approx(0.040)
  assert cats["GEMM (dot)"]["share"] == pytest.approx(0.4444, abs=1e-4)
  assert cats["while / call bookkeeping"]["ms_per_step"] == pytest.approx(0.008)
  assert cats["reduce"]["ms_per_step_in_loops"] == 0.0  # ran during the loop, not in it
  without_hlo = {c["category"]: c for c in pp.summarize(events)["categories"]}
  assert without_hlo["GEMM (dot)"]["ms_per_step_in_loops"] == pytest.approx(0.040)  # nesting
  assert sum(c["share"] for c in s["categories"]) == pytest.approx(1.0, abs=1e-3)
  top = s["top_ops"]
  assert [o["name"] for o in top] == ["ynn_fusion.1", "ynn_fusion.2", "while.3"]
  assert top[0]["count_per_step"] == 2 and top[0]["source"] == "jvp()/dot_general"
  md = pp.markdown(s)
  assert "| GEMM (dot) | 0.04 | 44.4 % | 2 | 0.04 |" in md
  assert "| `ynn_fusion.1` | GEMM (dot) | 2 | 0.04 | 44.4 % | `f32[8,16]{1,0}` |" in md


def test_other_module_and_errors(events, tmp_path):
  s = pp.summarize(events, module="jit__threefry_fold_in")
  assert s["steps"] == 1 and s["op_ms"] == pytest.approx(0.009)
  assert s["hlo_ops_found"] == 0 and s["categories"][0]["category"] == "other"
  with pytest.raises(ValueError, match="not in the trace"):
    pp.summarize(events, module="jit_nothing")
  with pytest.raises(ValueError, match="host_tracer_level"):
    pp.summarize([e for e in events if "hlo_op" not in e.get("args", {})])
  path = tmp_path / "t.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  assert pp.load_trace(str(path)) == events
