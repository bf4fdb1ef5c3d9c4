"""Weight conversion: official X2-VLM `.th` / safetensors and HF towers <-> our param tree.

`common` holds the table-driven strict merge shared by all importers; `official` the X2-VLM
checkpoint layout; `safetensors_io` and `torch_io` the file formats. Run
`python -m x2vlm_jax.convert --help` for the command-line tool.
"""
