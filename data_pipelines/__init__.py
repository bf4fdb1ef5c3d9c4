"""X²-VLM input data: record formats, sources, per-example transforms and the grain pipeline.

A standalone package (it imports nothing from `x2vlm_jax`). Its top-level modules are the
runtime that training and evaluation import; `tools/` holds the command-line tools and
`testing/` the helpers only tests and benchmarks use (docs/data.md, "Package layout").
"""
