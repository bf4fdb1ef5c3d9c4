"""Downstream evaluators. The metric functions (`retrieval.py`, `grounding.py`) are plain
functions of arrays and scorer callables (never of the model class); `run.py` binds them to a
model, so the same code runs inside `train.py` and `eval.py`. Which evaluators exist is the
explicit table `settings.EVALUATORS` (config name -> settings), no registry.
"""

from x2vlm_jax.evaluators.grounding import evaluate_grounding
from x2vlm_jax.evaluators.retrieval import evaluate_retrieval, evaluate_retrieval_itc, recall_at_k

__all__ = ["evaluate_grounding", "evaluate_retrieval", "evaluate_retrieval_itc", "recall_at_k"]
