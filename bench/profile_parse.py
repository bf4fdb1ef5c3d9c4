"""Per-op cost of a compiled XLA step, from a JAX profiler trace (bench/profile_step.py).

On XLA CPU (jax 0.10) the thunk executor records one trace event per executed HLO op (a "thunk")
when the host tracer is on: in the Chrome / Perfetto trace JSON these are complete events
(`ph == "X"`) whose `args` carry `hlo_module`, `hlo_op` and `run_id` (one per execution of the
module). A `while` (or `call`, `conditional`) event encloses the events of those of its body
ops that ran on the same thread, so every op is charged its EXCLUSIVE time (its duration minus
that of the op events nested in it); what is left to a `while` is its loop bookkeeping plus any
wait for body ops the executor ran on another thread (XLA CPU runs independent ops of one
computation concurrently). Whether an op belongs to a loop / call body is therefore read from
the HLO (its computation is not the entry one), and from same-thread nesting only without it.
Paired `end: <op>` markers and the executor's own events carry no `hlo_op` and are ignored.

The op names say little by themselves (`ynn_fusion.40` may be a GEMM or a reduction), so the
optimised HLO text of the module (`compiled.as_text()`) is parsed too: each op's opcode, output
shape, fusion kind, the opcodes of its fused computation and the source `op_name` of its
metadata. Without it the categories fall back to what XLA CPU's fusion names spell
(`broadcast_add_fusion`, `wrapped_copy`).

Pure Python (no jax): tests/test_profile_parse.py runs it on a hand-written trace.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re

# Source op_name fragments of jax.random's samplers: the ops they lower to (threefry rounds in
# while loops, bit twiddling, key copies) are random-number generation whatever their opcode.
_RNG_SOURCE = re.compile(r"_uniform|_bernoulli|_gumbel|threefry|random_bits|_normal\b|random_")
_RNG_OPCODES = {"rng", "rng-bit-generator", "rng-get-and-update-state"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_CONTROL = {"while", "conditional", "call"}
_LAYOUT = {"copy", "transpose"}
_MOVE_ONLY = {"copy", "transpose", "bitcast", "reshape", "parameter"}
_FILL_ONLY = {"broadcast", "constant", "iota", "parameter", "bitcast", "reshape"}
_SLICES = {"dynamic-slice", "dynamic-update-slice"}
# what a slice read / write may fuse and still only move data
_SLICE_MOVES = _MOVE_ONLY | _FILL_ONLY | _SLICES | {"slice", "tuple", "get-tuple-element"}

CATEGORIES = (
  "GEMM (dot)",
  "convolution",
  "rng (random bits, dropout masks)",
  "collectives",
  "gather / scatter",
  "dynamic-slice / update (data movement)",
  "fusion: elementwise with dynamic-slice / update",
  "copy / transpose",
  "reduce",
  "broadcast fill",
  "fusion: loop (elementwise)",
  "fusion: input",
  "fusion: output",
  "fusion: other",
  "while / call bookkeeping",
  "other",
)


@dataclasses.dataclass
class OpInfo:
  """One HLO instruction of the optimised module."""

  opcode: str
  shape: str = ""
  kind: str = ""  # fusion kind: kLoop, kInput, kOutput, kCustom (+ "/__ynn_fusion" ...)
  fused: frozenset = frozenset()  # opcodes inside the fused computation
  root: str = ""  # opcode of the fused computation's root
  source: str = ""  # metadata op_name
  in_body: bool | None = None  # in a while body / called computation (None: not from the HLO)
  operand: str = ""  # the first operand's name


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")


def _split_type(rest: str) -> tuple[str, str]:
  """(type, text after it) of an instruction's right-hand side; tuple types hold spaces."""
  if not rest.startswith("("):
    shape, _, after = rest.partition(" ")
    return shape, after
  depth = 0
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rest[: i + 1], rest[i + 1 :].lstrip()
  return rest, ""


def parse_hlo(text: str) -> dict[str, OpInfo]:
  """Every instruction of an HLO module's text, by name (fusions know their computation)."""
  ops: dict[str, OpInfo] = {}
  calls: dict[str, str] = {}
  comps: dict[str, list[str]] = collections.defaultdict(list)
  roots: dict[str, str] = {}
  comp, in_body = None, None
  for line in text.splitlines():
    if line.startswith("}"):
      comp = None
      continue
    m = _COMP.match(line)
    if m and not line.startswith(" "):
      comp = m.group(1)
      in_body = not line.startswith("ENTRY")
      continue
    m = _INSTR.match(line)
    if not m or comp is None:
      continue
    name, rest = m.group(1), m.group(2)
    shape, after = _split_type(rest)
    op = re.match(r"([\w\-]+)\(", after)
    if not op:
      continue
    info = OpInfo(opcode=op.group(1), shape=shape, in_body=in_body)
    first = re.match(r"[\w\-]+\(%?([\w.\-]+)", after)
    info.operand = first.group(1) if first else ""
    kind = re.search(r"\bkind=(k\w+)", after)
    custom = re.search(r'"fusion_config":\{"kind":"(\w+)"', after)
    info.kind = (kind.group(1) if kind else "") + (f"/{custom.group(1)}" if custom else "")
    src = re.search(r'op_name="([^"]*)"', after)
    info.source = src.group(1) if src else ""
    called = re.search(r"\bcalls=%?([\w.\-]+)", after)
    if called:
      calls[name] = called.group(1)
    comps[comp].append(info.opcode)
    if line.lstrip().startswith("ROOT"):
      roots[comp] = info.opcode
    ops[name] = info
  for name, comp_name in calls.items():
    ops[name].fused = frozenset(comps.get(comp_name, ()))
    ops[name].root = roots.get(comp_name, "")
  return ops


def info_from_name(name: str) -> OpInfo:
  """What an op's name alone says (XLA CPU names fusions after the opcodes they fuse)."""
  base = re.sub(r"\.\d+$", "", name)
  if base.startswith("wrapped_"):
    inner = base[len("wrapped_") :]
    return OpInfo(opcode="fusion", kind="kLoop", fused=frozenset({inner}), root=inner)
  if base.endswith("_fusion"):
    parts = frozenset(base[: -len("_fusion")].split("_"))
    if base.startswith(("ynn", "onednn", "xnn")):
      return OpInfo(opcode="fusion", kind="kCustom", fused=frozenset({"dot"}))
    return OpInfo(opcode="fusion", kind="kLoop", fused=parts)
  return OpInfo(opcode=base)


def _has(info: OpInfo, *names: str) -> bool:
  return info.opcode in names or any(n in info.fused for n in names)


def category(info: OpInfo) -> str:
  """The cost category of one op (first match in the order of CATEGORIES' reasoning)."""
  if info.opcode in _RNG_OPCODES or _RNG_SOURCE.search(info.source):
    return "rng (random bits, dropout masks)"
  if any(
    info.opcode.startswith(c) or any(f.startswith(c) for f in info.fused) for c in _COLLECTIVES
  ):
    return "collectives"
  if info.opcode in _CONTROL:
    return "while / call bookkeeping"
  if _has(info, "dot"):
    return "GEMM (dot)"
  if _has(info, "convolution"):
    return "convolution"
  if _has(info, "gather", "scatter", "select-and-scatter"):
    return "gather / scatter"
  if _has(info, *_SLICES):
    if info.opcode in _SLICES or info.fused <= _SLICE_MOVES:
      return "dynamic-slice / update (data movement)"
    return "fusion: elementwise with dynamic-slice / update"  # the math of a layer, in a loop
  if info.opcode in _LAYOUT or (info.fused and info.fused <= _MOVE_ONLY):
    return "copy / transpose"
  if info.opcode == "fusion" and info.root in _LAYOUT and info.fused <= _MOVE_ONLY | _FILL_ONLY:
    return "copy / transpose"
  if _has(info, "reduce", "reduce-window"):
    return "reduce"
  if info.opcode == "broadcast" or (info.fused and info.fused <= _FILL_ONLY):
    return "broadcast fill"
  if info.opcode == "fusion":
    kind = info.kind.split("/")[0]
    return {
      "kLoop": "fusion: loop (elementwise)",
      "kInput": "fusion: input",
      "kOutput": "fusion: output",
    }.get(kind, "fusion: other")
  return "other"


def load_trace(path: str) -> list[dict]:
  """The events of a Chrome / Perfetto trace JSON file (gzipped or not)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def op_events(events: list[dict], module: str | None = None) -> tuple[str, list[dict]]:
  """(module, its op events): the given module, else the one with the most op events."""
  ops = [e for e in events if e.get("ph") == "X" and (e.get("args") or {}).get("hlo_op")]
  if not ops:
    raise ValueError(
      "the trace has no per-op events (args.hlo_op): was the host tracer on "
      "(ProfileOptions.host_tracer_level >= 1)?"
    )
  counts = collections.Counter(e["args"].get("hlo_module") for e in ops)
  module = module or counts.most_common(1)[0][0]
  if module not in counts:
    raise ValueError(f"module {module!r} not in the trace; it has {sorted(counts)}")
  return module, [e for e in ops if e["args"].get("hlo_module") == module]


def exclusive_times(ops: list[dict]) -> tuple[list[float], list[bool]]:
  """Each event's duration minus that of the op events nested in it on its thread (us), and
  whether it ran nested in another op (in a loop body or called computation)."""
  order = sorted(range(len(ops)), key=lambda i: (ops[i]["tid"], ops[i]["ts"], -ops[i]["dur"]))
  excl = [float(e["dur"]) for e in ops]
  nested = [False] * len(ops)
  stack: list[int] = []
  tid = None
  for i in order:
    e = ops[i]
    if e["tid"] != tid:
      stack, tid = [], e["tid"]
    while stack and ops[stack[-1]]["ts"] + ops[stack[-1]]["dur"] <= e["ts"]:
      stack.pop()
    if stack:
      excl[stack[-1]] -= e["dur"]
      nested[i] = True
    stack.append(i)
  return [max(x, 0.0) for x in excl], nested


def _busy_us(intervals: list[tuple[float, float]]) -> float:
  """Length of the union of [start, end) intervals."""
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if e <= end:
      continue
    total += e - max(s, end)
    end = e
  return total


def _spans(ops: list[dict]) -> tuple[float, float]:
  """(mean first-op-to-last-op span of one execution, mean time any op runs in it) in us."""
  by_run: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
  for e in ops:
    by_run[e["args"].get("run_id", "")].append((e["ts"], e["ts"] + e["dur"]))
  spans = [max(b for _, b in iv) - min(a for a, _ in iv) for iv in by_run.values()]
  busy = [_busy_us(iv) for iv in by_run.values()]
  return sum(spans) / len(spans), sum(busy) / len(busy)


def _elements(shape: str) -> int:
  """Element count of an array type like `f32[2,72,16]{2,1,0}` (a tuple: 0)."""
  m = re.match(r"^\w+\[([\d,]*)\]", shape)
  if not m:
    return 0
  n = 1
  for d in filter(None, m.group(1).split(",")):
    n *= int(d)
  return n


def _short_source(source: str, width: int = 70) -> str:
  """The tail of a metadata op_name (the jit(step)/... prefix says nothing)."""
  source = re.sub(r"^jit\(step\)/", "", source)
  return source if len(source) <= width else "..." + source[-(width - 3) :]


def _per_op(ops: list[dict]) -> tuple[dict, dict, float]:
  """({op: [executions, exclusive us]}, {op: exclusive us nested in a while / call}, total us)."""
  excl, nested = exclusive_times(ops)
  per_op: dict[str, list[float]] = {}
  in_loops: dict[str, float] = collections.Counter()
  for e, x, inner in zip(ops, excl, nested):
    name = e["args"]["hlo_op"]
    rec = per_op.setdefault(name, [0, 0.0])
    rec[0] += 1
    rec[1] += x
    in_loops[name] += x if inner else 0.0
  return per_op, in_loops, sum(excl)


def _copies(per_op: dict, infos: dict, hlo: dict) -> dict[str, list[float]]:
  """[executions, us] of the copies by kind. small: <= 4 elements (keys, counters), else
  tensor; of_fills: copies of a broadcast fill (a zero-filled buffer copied into each loop /
  output buffer that starts from it)."""
  copies = {"small": [0, 0.0], "tensor": [0, 0.0], "of_fills": [0, 0.0]}
  for name, (n, us) in per_op.items():
    info = infos[name]
    if info.opcode != "copy" or not info.shape:
      continue
    kinds = ["small" if _elements(info.shape) <= 4 else "tensor"]
    if info.operand in hlo and category(hlo[info.operand]) == "broadcast fill":
      kinds.append("of_fills")
    for k in kinds:
      copies[k][0] += n
      copies[k][1] += us
  return copies


def summarize(
  events: list[dict], hlo: dict[str, OpInfo] | None = None, module: str | None = None, top: int = 25
) -> dict:
  """Per-step cost by category and by op of one module's executions in a trace (times in ms)."""
  module, ops = op_events(events, module)
  steps = len({e["args"].get("run_id", "") for e in ops})
  hlo = hlo or {}
  per_op, in_loops, total_us = _per_op(ops)
  infos = {name: hlo.get(name) or info_from_name(name) for name in per_op}
  for name, info in infos.items():
    if info.in_body is not None:  # the HLO knows; the trace only sees same-thread nesting
      in_loops[name] = per_op[name][1] if info.in_body else 0.0
  cats = {c: [0, 0.0, 0.0] for c in CATEGORIES}
  for name, (n, us) in per_op.items():
    rec = cats[category(infos[name])]
    rec[0] += n
    rec[1] += us
    rec[2] += in_loops[name]
  span_us, busy_us = _spans(ops)

  def count(pred) -> float:
    return round(sum(n for name, (n, _) in per_op.items() if pred(infos[name])) / steps, 1)

  ranked = sorted(per_op.items(), key=lambda kv: -kv[1][1])[:top]
  copies = _copies(per_op, infos, hlo)
  return {
    "module": module,
    "steps": steps,
    "devices": len({e["args"].get("device_ordinal", "") for e in ops}),
    "span_ms": round(span_us / 1e3, 3),
    "busy_ms": round(busy_us / 1e3, 3),
    "op_ms": round(total_us / steps / 1e3, 3),
    "ops_per_step": count(lambda i: i.opcode not in _CONTROL),
    "copies_per_step": count(lambda i: i.opcode == "copy"),
    "scalar_ops_per_step": count(lambda i: i.opcode not in _CONTROL and i.shape.endswith("[]")),
    "hlo_ops_found": sum(name in hlo for name in per_op),
    "copies_by_size": {
      k: {"per_step": round(n / steps, 1), "ms_per_step": round(us / steps / 1e3, 3)}
      for k, (n, us) in copies.items()
    },
    "distinct_ops": len(per_op),
    "categories": [
      {
        "category": c,
        "ms_per_step": round(us / steps / 1e3, 3),
        "share": round(us / total_us, 4) if total_us else 0.0,
        "ops_per_step": round(n / steps, 1),
        "ms_per_step_in_loops": round(loop_us / steps / 1e3, 3),
      }
      for c, (n, us, loop_us) in sorted(cats.items(), key=lambda kv: -kv[1][1])
      if n
    ],
    "top_ops": [
      {
        "name": name,
        "category": category(infos[name]),
        "count_per_step": round(n / steps, 2),
        "ms_per_step": round(us / steps / 1e3, 3),
        "share": round(us / total_us, 4) if total_us else 0.0,
        "shape": infos[name].shape,
        "source": _short_source(infos[name].source),
      }
      for name, (n, us) in ranked
    ],
  }


def _short_shape(shape: str) -> str:
  """An array type as is; a loop's tuple type by its element count (the JSON has it whole)."""
  return f"tuple of {shape.count('[')}" if shape.startswith("(") else f"`{shape}`"


def markdown(summary: dict) -> str:
  """The summary as two Markdown tables (categories, top ops) under a few figures."""
  s = summary
  head = [
    f"module `{s['module']}`, {s['steps']} profiled steps on {s['devices']} device(s) (figures "
    "per step, summed over the devices); per step: first-to-last op "
    f"{s['span_ms']:.1f} ms, some op running {s['busy_ms']:.1f} ms, op time (exclusive, summed "
    f"over threads) {s['op_ms']:.1f} ms; {s['ops_per_step']:.0f} ops executed "
    f"({s['copies_per_step']:.0f} copies, {s['scalar_ops_per_step']:.0f} with a scalar output); "
    f"{s['distinct_ops']} distinct ops, {s['hlo_ops_found']} found in the HLO text.",
  ]
  c = s["copies_by_size"]
  if c["small"]["per_step"] or c["tensor"]["per_step"]:
    head.append(
      f"Copies of <= 4 elements (keys, counters): {c['small']['per_step']:.0f} per step, "
      f"{c['small']['ms_per_step']:.2f} ms; larger copies: {c['tensor']['per_step']:.0f}, "
      f"{c['tensor']['ms_per_step']:.2f} ms, of which copies of a broadcast fill: "
      f"{c['of_fills']['per_step']:.0f}, {c['of_fills']['ms_per_step']:.2f} ms."
    )
  lines = [
    " ".join(head),
    "",
    "| category | ms / step | share | ops / step | of which in loop / call bodies, ms |",
    "|---|---|---|---|---|",
  ]
  for c in s["categories"]:
    lines.append(
      f"| {c['category']} | {c['ms_per_step']:.2f} | {100 * c['share']:.1f} % "
      f"| {c['ops_per_step']:.0f} | {c['ms_per_step_in_loops']:.2f} |"
    )
  lines += [
    "",
    "| op | category | count / step | ms / step | share | shape | source (op_name) |",
    "|---|---|---|---|---|---|---|",
  ]
  for o in s["top_ops"]:
    src = o["source"].replace("|", "\\|")
    lines.append(
      f"| `{o['name']}` | {o['category']} | {o['count_per_step']:g} | {o['ms_per_step']:.2f} "
      f"| {100 * o['share']:.1f} % | {_short_shape(o['shape'])} | {src} |"
    )
  return "\n".join(lines) + "\n"
