"""The repository's structure as tests: imports only go down the layers, files and functions stay
small, and production code carries no test switches (docs/architecture.md, "Layers").

Imports are read from the source (every `import` statement, including those inside functions),
so a lazy import cannot hide a back-edge.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipelines", "x2vlm_jax")

# Layer of each module (longest dotted prefix wins); a module may import its own layer or lower.
LAYERS = {
  "data_pipelines": 0,  # standalone: formats, transforms, grain pipelines
  "x2vlm_jax.sharding": 1,
  "x2vlm_jax.treepath": 1,
  "x2vlm_jax.box_ops": 1,
  "x2vlm_jax.assets": 1,
  "x2vlm_jax.flops": 1,
  "x2vlm_jax.preemption": 1,
  "x2vlm_jax.metrics_writer": 1,
  "x2vlm_jax.run_env": 1,
  "x2vlm_jax.cpu_host": 1,
  "x2vlm_jax.paths": 1,
  "x2vlm_jax.cli": 1,
  "x2vlm_jax.global_batch": 1,
  "x2vlm_jax.models": 2,  # features only: towers, heads, the X2VLM module
  "x2vlm_jax.losses": 3,
  "x2vlm_jax.mvptr_losses": 3,
  "x2vlm_jax.mvptr_concepts": 3,
  "x2vlm_jax.mvptr_assign": 3,
  "x2vlm_jax.shard_concat": 3,
  "x2vlm_jax.optim": 3,
  "x2vlm_jax.checkpoint": 3,
  "x2vlm_jax.checksums": 3,
  "x2vlm_jax.ckpt_manifest": 3,
  "x2vlm_jax.ckpt_config": 3,
  "x2vlm_jax.params_io": 3,
  "x2vlm_jax.convert": 3,
  "x2vlm_jax.train_state": 4,
  "x2vlm_jax.init_lib": 4,
  "x2vlm_jax.init_mvptr": 4,
  "x2vlm_jax.objectives": 5,
  "x2vlm_jax.mvptr_objectives": 5,
  "x2vlm_jax.train_step": 5,
  "x2vlm_jax.step_jit": 5,
  "x2vlm_jax.tasks": 5,
  "x2vlm_jax.tasks_vqa": 5,
  "x2vlm_jax.tasks_cls": 5,
  "x2vlm_jax.tasks_mvptr": 5,
  "x2vlm_jax.tasks_caption": 5,
  "x2vlm_jax.tasks_mvptr_pretrain": 5,
  "x2vlm_jax.tasks_mvptr_finetune": 5,
  "x2vlm_jax.caption_decode": 5,
  "x2vlm_jax.evaluators": 6,  # beside the loop: never imports it
  "x2vlm_jax.run_config": 7,
  "x2vlm_jax.run_config_mvptr": 7,
  "x2vlm_jax.train_data": 7,
  "x2vlm_jax.train_batches": 7,
  "x2vlm_jax.train_report": 7,
  "x2vlm_jax.train_lib": 7,
  "x2vlm_jax.export": 7,
  "x2vlm_jax.train_eval": 7,
  "x2vlm_jax.demo": 8,
  "x2vlm_jax.finetune_demo": 8,
  "x2vlm_jax.vqa_demo": 8,
  "x2vlm_jax.mvptr_demo": 8,
  "configs": 8,
}
EXACT = {"x2vlm_jax": 1}  # the package itself (a prefix entry would hide unlisted modules)
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules():
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob("*.py")):
      rel = path.relative_to(ROOT).with_suffix("")
      parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
      yield ".".join(parts), path


def _layer(module: str) -> int | None:
  if module in EXACT:
    return EXACT[module]
  best = None
  for prefix, layer in LAYERS.items():
    if module == prefix or module.startswith(prefix + "."):
      if best is None or len(prefix) > len(best[0]):
        best = (prefix, layer)
  return None if best is None else best[1]


def _imports(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
  """(line, imported module) of every import of the file, relative ones resolved."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = (
          module.split(".")[: -node.level]
          if path.name != "__init__.py"
          else module.split(".")[: len(module.split(".")) - node.level + 1]
        )
        base = ".".join(pkg + ([base] if base else []))
      out.append((node.lineno, base))
      # `from pkg import module` imports a module too.
      out += [
        (node.lineno, f"{base}.{a.name}")
        for a in node.names
        if _layer(f"{base}.{a.name}") is not None and base in LAYERS
      ]
  return out


def test_every_module_has_a_layer():
  missing = [m for m, _ in _modules() if _layer(m) is None]
  assert not missing, f"add these modules to LAYERS: {missing}"


def test_imports_only_go_down():
  back_edges = []
  for module, path in _modules():
    mine = _layer(module)
    for line, imported in _imports(path, module):
      theirs = _layer(imported)
      if theirs is not None and theirs > mine:
        back_edges.append(
          f"{path.relative_to(ROOT)}:{line} ({module}, layer {mine}) imports "
          f"{imported} (layer {theirs})"
        )
  assert not back_edges, "\n".join(back_edges)


def test_data_pipelines_is_standalone():
  for module, path in _modules():
    if module.startswith("data_pipelines"):
      bad = [(l, m) for l, m in _imports(path, module) if m.split(".")[0] == "x2vlm_jax"]
      assert not bad, f"{path}: {bad}"


def _python_files():
  skip = {"configs"}
  for path in sorted(ROOT.rglob("*.py")):
    rel = path.relative_to(ROOT)
    if rel.parts[0].startswith(".") or rel.parts[0] in skip:
      continue
    yield rel, path


def test_files_and_functions_are_small():
  problems = []
  for rel, path in _python_files():
    text = path.read_text()
    lines = text.count("\n")
    if lines > MAX_FILE_LINES:
      problems.append(f"{rel}: {lines} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          problems.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("word", ["naive", "grad_hook", "poison", "debug_nan"])
def test_no_test_switches_in_production_code(word):
  hits = []
  for module, path in _modules():
    for i, line in enumerate(path.read_text().splitlines(), 1):
      if word in line.lower():
        hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
  assert not hits, "\n".join(hits)
