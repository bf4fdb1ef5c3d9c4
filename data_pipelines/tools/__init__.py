"""Command-line tools over the data package, run as `python -m data_pipelines.tools.<name>`.

  validate       lists every bad record of a data source, counted per skip reason
  convert_jsonl  official JSON lines -> TFDS ArrayRecord dataset of canonical records

Nothing in the training or evaluation pipeline imports these.
"""
