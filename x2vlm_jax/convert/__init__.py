"""Weight conversion: official X2-VLM `.th` / safetensors and HF towers <-> our param tree.

`common` holds the table-driven strict merge shared by all importers and `transforms` its tensor
re-layouts; `official_spec` the X2-VLM checkpoint's keys and `official` their mapping to our
paths (`official_config` recovers the model config); `hf` the BERT / BEiT-2 tower importers;
`apply` writes any importer's arrays into a model; `arrays` turns tensors into numpy;
`safetensors_io` and `torch_io` the file formats. Run `python -m x2vlm_jax.convert --help` for
the command-line tool.
"""
