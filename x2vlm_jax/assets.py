"""Locations of offline assets shipped by installed packages (no hub access at run time).

The resolver lives in `data_pipelines.assets` (the data package is the lower layer: its tokenizer
comes from the same MiniLM package); it is re-exported here for the model side.
"""

from data_pipelines.assets import minilm_dir

__all__ = ["minilm_dir"]
