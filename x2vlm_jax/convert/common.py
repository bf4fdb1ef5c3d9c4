"""Table-driven, strict weight merging between a foreign flat state dict and our param tree.

A converter is a list of `Rule`s: a regular expression over foreign keys, the dotted path of our
parameter it fills (optionally one slice of a stacked `[depth, ...]` array, picked by the regex
group `layer`), and a `Transform` that knows both directions and the foreign shape it expects.
`merge` fills a nested dict shaped like an expected tree and returns a `CoverageReport` naming
every key that was missing on our side, unexpected on the foreign side, of the wrong shape, or
that failed a value check (tied weights, non-learned buffers). `export` walks the same rules
backwards to produce a foreign state dict in a given key order.

Pure NumPy on purpose: no device memory is touched while converting, so a 600M-parameter
checkpoint converts on a host without accelerators.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from x2vlm_jax import treepath
from x2vlm_jax.convert.transforms import IDENTITY, Shape, Transform

# Kinds of mismatch a caller may allow (everything else is an error).
MISMATCH_KINDS = ("missing", "unexpected", "shape", "check")


# ---------------------------------------------------------------------------------------------
# Rules and the coverage report.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """Maps foreign keys matching `pattern` (full match) to our parameter `target`.

  target: dotted path in our tree; may use regex group references (`\\g<name>`). `None` marks
    a non-learned foreign entry (a buffer): it is checked against `expect(match)` on import and
    written from it on export.
  layer_group: if the pattern has this named group, its integer value minus `layer_offset` is
    the index into the leading (stacked layer) axis of the target; `layer_range` (half-open, in
    foreign numbering) restricts which values the rule applies to, so one foreign stack can be
    split into two of ours (e.g. text layers 0-11 and fusion layers 12-17).
  tied: the entry duplicates a value already provided by another rule (a tied weight). Import
    checks equality instead of writing; export writes the same value again.
  """

  pattern: str
  target: str | None
  transform: Transform = IDENTITY
  layer_group: str = "layer"
  layer_offset: int = 0
  layer_range: tuple[int, int] | None = None
  tied: bool = False
  expect: Callable[[re.Match], np.ndarray] | None = None

  def match(self, key: str) -> re.Match | None:
    """The regex match if this rule applies to `key` (pattern and layer range), else None."""
    m = re.fullmatch(self.pattern, key)
    if m is None:
      return None
    if self.layer_range is not None:
      idx = self._foreign_layer(m)
      if idx is None or not self.layer_range[0] <= idx < self.layer_range[1]:
        return None
    return m

  def _foreign_layer(self, m: re.Match) -> int | None:
    if self.layer_group in (m.re.groupindex or {}):
      return int(m.group(self.layer_group))
    return None

  def resolve(self, m: re.Match) -> tuple[str | None, int | None]:
    """(our dotted path, index into the stacked axis or None) for one matched foreign key."""
    path = m.expand(self.target) if self.target is not None else None
    idx = self._foreign_layer(m)
    return path, (None if idx is None else idx - self.layer_offset)


@dataclasses.dataclass
class CoverageReport:
  """What a merge matched and what it did not, each entry naming the key(s) involved."""

  matched: list[str] = dataclasses.field(default_factory=list)  # foreign keys used
  missing: list[str] = dataclasses.field(default_factory=list)  # our paths ("a.b[3]") not filled
  unexpected: list[str] = dataclasses.field(default_factory=list)  # foreign keys no rule took
  shape: list[str] = dataclasses.field(
    default_factory=list
  )  # "key: got (..) expected (..) for path"
  check: list[str] = dataclasses.field(default_factory=list)  # tied/buffer value failures
  notes: list[str] = dataclasses.field(default_factory=list)  # informational (e.g. dropped buffers)

  def errors(self, allow: Iterable[str] = ()) -> dict[str, list[str]]:
    """Mismatch lists that are not allowed, by kind (empty dict = clean)."""
    allow = _check_kinds(allow)
    return {k: getattr(self, k) for k in MISMATCH_KINDS if getattr(self, k) and k not in allow}

  def ok(self, allow: Iterable[str] = ()) -> bool:
    """True if no mismatch outside `allow` was found."""
    return not self.errors(allow)

  def summary(self, limit: int = 20) -> str:
    """Human-readable report: counts, then up to `limit` names per kind."""
    lines = [
      f"matched {len(self.matched)} foreign entries; missing {len(self.missing)}, "
      f"unexpected {len(self.unexpected)}, shape mismatches {len(self.shape)}, "
      f"failed checks {len(self.check)}"
    ]
    for kind in MISMATCH_KINDS + ("notes",):
      items = getattr(self, kind)
      if items:
        lines.append(f"  {kind}:")
        lines.extend(f"    {x}" for x in items[:limit])
        if len(items) > limit:
          lines.append(f"    ... and {len(items) - limit} more")
    return "\n".join(lines)

  def raise_unless_ok(self, allow: Iterable[str] = (), what: str = "conversion") -> None:
    """Raises `ConversionError` (with this report attached) on any mismatch outside `allow`."""
    errs = self.errors(allow)
    if errs:
      raise ConversionError(
        f"{what} failed ({', '.join(f'{len(v)} {k}' for k, v in errs.items())}; allow with "
        f"{sorted(errs)}):\n{self.summary()}",
        self,
      )


class ConversionError(ValueError):
  """A strict merge/export found mismatches; `.report` holds the full `CoverageReport`."""

  def __init__(self, message: str, report: CoverageReport | None = None):
    super().__init__(message)
    self.report = report


def _check_kinds(allow: Iterable[str]) -> set[str]:
  allow = set(allow)
  bad = allow - set(MISMATCH_KINDS)
  if bad:
    raise ValueError(f"unknown mismatch kinds {sorted(bad)}; expected a subset of {MISMATCH_KINDS}")
  return allow


# ---------------------------------------------------------------------------------------------
# Nested-dict helpers (our trees are plain nested dicts of arrays / ShapeDtypeStructs).
# ---------------------------------------------------------------------------------------------


def shape_dtype(leaf: Any) -> tuple[Shape, np.dtype]:
  """(shape, dtype) of an array, jax.ShapeDtypeStruct, or a `(shape, dtype)` pair."""
  if isinstance(leaf, tuple) and len(leaf) == 2 and not hasattr(leaf, "shape"):
    return tuple(leaf[0]), np.dtype(leaf[1])
  return tuple(leaf.shape), np.dtype(leaf.dtype)


# ---------------------------------------------------------------------------------------------
# Merge (foreign -> ours) and export (ours -> foreign).
# ---------------------------------------------------------------------------------------------


def find_rule(rules: Sequence[Rule], key: str) -> tuple[Rule, re.Match] | None:
  """The first rule whose pattern (and layer range) matches `key`."""
  for rule in rules:
    m = rule.match(key)
    if m is not None:
      return rule, m
  return None


def merge(
  foreign: Mapping[str, np.ndarray],
  rules: Sequence[Rule],
  expected: Mapping[str, Any],
  *,
  allow: Iterable[str] = (),
  init: Mapping[str, Any] | None = None,
  what: str = "import",
) -> tuple[dict[str, Any], CoverageReport]:
  """Fills a nested dict shaped like `expected` from `foreign` via `rules`; strict by default.

  expected: nested (or flat dotted) tree whose leaves give shape and dtype (arrays,
    ShapeDtypeStructs, or (shape, dtype) pairs) -- e.g. the pure dict of `nnx.eval_shape`.
  allow: mismatch kinds that do not raise (subset of MISMATCH_KINDS).
  init: optional tree of concrete arrays used for slots the foreign dict does not fill (e.g.
    freshly initialised cross-attention). Without it, a leaf with no foreign value at all is left
    out of the result, and missing layers of a stacked leaf are zero.
  Returns (nested dict of numpy arrays, report). Raises `ConversionError` naming every offending
  key unless all mismatches are allowed.
  """
  allow = _check_kinds(allow)
  exp = (
    expected
    if all(not isinstance(v, Mapping) for v in expected.values())
    else treepath.flatten_dict(expected)
  )
  st = _MergeState(
    {k: shape_dtype(v) for k, v in exp.items()},
    treepath.flatten_dict(init) if init is not None else {},
  )
  for key, value in foreign.items():
    value = np.asarray(value)
    found = find_rule(rules, key)
    if found is None:
      st.report.unexpected.append(key)
      continue
    rule, m = found
    path, idx = rule.resolve(m)
    if path is None:  # a non-learned buffer: check against the formula, then drop
      _check_buffer(st.report, key, value, rule, m)
    elif rule.tied:
      st.tied.append((key, rule, m, value))
    else:
      _fill(st, key, value, rule, path, idx)
  _check_tied(st)
  _fill_missing(st)
  st.report.raise_unless_ok(allow, what)
  return treepath.unflatten_dict(st.out), st.report


@dataclasses.dataclass
class _MergeState:
  """What `merge` has built so far."""

  exp: dict[str, tuple[Shape, np.dtype]]  # our dotted path -> (shape, dtype)
  init: dict[str, Any]  # our dotted path -> concrete init value
  report: CoverageReport = dataclasses.field(default_factory=CoverageReport)
  filled: dict[str, set] = dataclasses.field(
    default_factory=dict
  )  # path -> layer indices; {None}: unstacked
  out: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  tied: list[tuple[str, Rule, re.Match, np.ndarray]] = dataclasses.field(default_factory=list)


def _check_buffer(
  report: CoverageReport, key: str, value: np.ndarray, rule: Rule, m: re.Match
) -> None:
  """A non-learned foreign buffer: matched if it equals `rule.expect`, else reported."""
  if rule.expect is None:
    report.notes.append(f"{key}: dropped")
    return
  want = rule.expect(m)
  if value.shape != want.shape:
    report.shape.append(f"{key}: got {value.shape} expected {want.shape} (buffer)")
  elif not np.array_equal(value, want):
    bad = int(np.sum(value != want))
    report.check.append(f"{key}: buffer differs from its formula in {bad} entries")
  else:
    report.matched.append(key)


def _fill(
  st: _MergeState, key: str, value: np.ndarray, rule: Rule, path: str, idx: int | None
) -> None:
  """Writes one learned foreign entry into its slot of our param (or reports why not)."""
  report = st.report
  if path not in st.exp:
    report.unexpected.append(f"{key} -> {path} (no such parameter in our tree)")
    return
  full_shape, dtype = st.exp[path]
  layer_shape = full_shape if idx is None else full_shape[1:]
  if idx is not None and not (full_shape and 0 <= idx < full_shape[0]):
    report.unexpected.append(f"{key} -> {path}[{idx}] (layer index outside depth {full_shape[:1]})")
    return
  want_foreign = tuple(rule.transform.foreign_shape(layer_shape))
  if value.shape != want_foreign:
    report.shape.append(
      f"{key}: got {value.shape} expected {want_foreign} (for {_slot(path, idx)} {layer_shape})"
    )
    return
  ours = _cast(rule.transform.to_ours(value, layer_shape), dtype, key)
  slots = st.filled.setdefault(path, set())
  if idx in slots:
    report.check.append(f"{key}: {_slot(path, idx)} already filled by another key")
    return
  slots.add(idx)
  if idx is None:
    st.out[path] = ours
  else:
    if path not in st.out:
      st.out[path] = (
        np.array(st.init[path], dtype=dtype) if path in st.init else np.zeros(full_shape, dtype)
      )
    st.out[path][idx] = ours
  report.matched.append(key)


def _check_tied(st: _MergeState) -> None:
  """Tied entries: must equal the primary value they duplicate."""
  for key, rule, m, value in st.tied:
    path, idx = rule.resolve(m)
    if path not in st.out or (idx is not None and idx not in st.filled.get(path, ())):
      st.report.check.append(f"{key}: tied to {_slot(path, idx)}, which was not provided")
      continue
    primary = st.out[path] if idx is None else st.out[path][idx]
    theirs = rule.transform.to_foreign(primary)
    if value.shape != theirs.shape:
      st.report.shape.append(
        f"{key}: got {value.shape} expected {theirs.shape} (tied to {_slot(path, idx)})"
      )
    elif not np.array_equal(value, theirs):
      diff = float(np.max(np.abs(value.astype(np.float64) - theirs.astype(np.float64))))
      st.report.check.append(
        f"{key}: tied to {_slot(path, idx)} but differs (max abs diff {diff:.3g})"
      )
    else:
      st.report.matched.append(key)


def _fill_missing(st: _MergeState) -> None:
  """Reports our params (or layers of a stacked one) no key filled; takes `init` for them."""
  for path, (shape, dtype) in st.exp.items():
    slots = st.filled.get(path, set())
    if path in st.out and None not in slots and len(slots) < shape[0]:
      gaps = [i for i in range(shape[0]) if i not in slots]
      st.report.missing.extend(_slot(path, i) for i in gaps)
    elif path not in st.out:
      if path in st.init:
        st.out[path] = np.asarray(st.init[path])
      st.report.missing.append(path)


def export(
  params: Mapping[str, Any],
  rules: Sequence[Rule],
  keys: Iterable[str],
  *,
  allow_unused: bool = False,
  what: str = "export",
) -> dict[str, np.ndarray]:
  """Writes our nested `params` as a foreign dict with exactly `keys`, in that order.

  Every key must match a rule; buffers come from `rule.expect`, tied entries repeat the primary
  value (as a separate array). Raises `ConversionError` naming keys without a rule or a source,
  and (unless `allow_unused`) our parameters that no key writes, since they would be lost.
  """
  flat = (
    treepath.flatten_dict(params)
    if any(isinstance(v, Mapping) for v in params.values())
    else dict(params)
  )
  out: dict[str, np.ndarray] = {}
  report = CoverageReport()
  used: set[str] = set()
  for key in keys:
    found = find_rule(rules, key)
    if found is None:
      report.unexpected.append(f"{key} (no rule)")
      continue
    rule, m = found
    path, idx = rule.resolve(m)
    if path is None:
      if rule.expect is None:
        report.missing.append(f"{key} (buffer without a formula)")
      else:
        out[key] = np.asarray(rule.expect(m))
      continue
    if path not in flat:
      report.missing.append(f"{_slot(path, idx)} (needed for {key})")
      continue
    leaf = np.asarray(flat[path])
    if idx is not None and not 0 <= idx < leaf.shape[0]:
      report.missing.append(f"{_slot(path, idx)} (needed for {key}; depth {leaf.shape[0]})")
      continue
    used.add(path)
    val = rule.transform.to_foreign(leaf if idx is None else leaf[idx])
    # np.ascontiguousarray would turn a 0-d array (e.g. `temp`) into shape (1,).
    out[key] = val if val.flags.c_contiguous else np.ascontiguousarray(val)
  unused = sorted(set(flat) - used)
  (report.notes if allow_unused else report.unexpected).extend(
    f"{p}: our parameter is not written by any foreign key" for p in unused
  )
  report.raise_unless_ok((), what)
  return out


def _slot(path: str | None, idx: int | None) -> str:
  return f"{path}" if idx is None else f"{path}[{idx}]"


def _cast(x: np.ndarray, dtype: np.dtype, key: str) -> np.ndarray:
  """Casts to our dtype; refuses to turn integers into floats silently (wrong tensor)."""
  if x.dtype == dtype:
    return x
  if np.issubdtype(x.dtype, np.floating) != np.issubdtype(dtype, np.floating):
    raise ConversionError(f"{key}: dtype {x.dtype} cannot become {dtype}")
  return x.astype(dtype)
