"""Downstream evaluators. Each is a plain function of arrays and model functions (never of the
model class), so the same code runs inside `train.py` and `eval.py`.

`EVALUATORS` maps the name used in configs to the function (an explicit table, no registry).
"""

from x2vlm_jax.evaluators.grounding import evaluate_grounding
from x2vlm_jax.evaluators.retrieval import evaluate_retrieval, evaluate_retrieval_itc, recall_at_k

EVALUATORS = {
    "retrieval": evaluate_retrieval,
    "retrieval_itc": evaluate_retrieval_itc,
    "grounding": evaluate_grounding,
}

__all__ = ["EVALUATORS", "evaluate_grounding", "evaluate_retrieval", "evaluate_retrieval_itc", "recall_at_k"]
