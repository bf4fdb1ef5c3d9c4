"""Import-time shims that let the official X^2-VLM pre-training model run here (torch 2.13 CPU,
transformers 5, no timm / torchvision / apex / ruamel), for `bench/official_step.py`.

The official checkout is never edited: `install(repo)` puts the repository on `sys.path` and
registers small replacements, written here, for what its import chain needs and this environment
lacks. Each one, and why (versions as pinned by the official requirements.txt):

1. `timm.models.layers` / `timm.models.registry` (timm 0.4.9 is not installed): `trunc_normal_`
   (torch's `nn.init.trunc_normal_`, same arguments), `to_2tuple`, per-sample stochastic depth
   `drop_path` / `DropPath`, and `register_model` as the identity decorator.
2. `torchvision.ops.boxes.box_area` (torchvision is not installed; `models/box_ops.py` imports it):
   (x1 - x0) * (y1 - y0) of xyxy boxes.
3. `transformers.modeling_utils` lost `apply_chunking_to_forward`, `prune_linear_layer`
   (moved to `transformers.pytorch_utils`), `find_pruneable_heads_and_indices` and
   `get_parameter_dtype` (removed) that `models/xbert.py` imports: the moved ones are re-exported,
   the removed ones re-written (head pruning is never called by the step).
4. `PreTrainedModel` of transformers 5 no longer has `get_head_mask` and `invert_attention_mask`,
   which `xbert.BertModel.forward` calls: added as transformers 4.12.5 defined them (no head mask
   -> one None per layer; key mask -> additive mask, 0 kept / -1e9 dropped in fp32). Only added
   when missing.
5. `BertPreTrainedModel.init_weights` (set by `patch_xbert()` once `models.xbert` is imported):
   transformers 5's `init_weights` needs state that only `post_init` creates, which xbert never
   calls; replaced by what 4.12.5's did: apply the class's `_init_weights` to every sub-module,
   then tie the MLM decoder weight to the word embeddings (`tie_word_embeddings`, default True).
6. `transformers.optimization.AdamW` (removed in transformers 5; `optim.py` imports it): an AdamW
   with the semantics of transformers 4.12.5's (bias-corrected Adam as a per-parameter loop, then
   decoupled weight decay p -= lr * wd * p after the update).
7. `models.xroberta` (imported unconditionally by `models/xvlm.py`; its docstring decorators fail
   under transformers 5): a module whose three names raise if used; the BERT configs never use it.
8. `utils` (the official package imports ruamel.yaml and the CIDEr scorer at import time; the
   model needs only `read_json`): a module with `read_json`.
9. `dataset` (imports torchvision, pycocotools-based code and the dataset classes; the model needs
   only `build_tokenizer(path).pad_token_id`): a module whose `build_tokenizer` returns an object
   with BERT's pad id 0, so no vocabulary file is read.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import os
import sys
import types


def _module(name: str, **attrs) -> types.ModuleType:
  mod = types.ModuleType(name)
  # A spec, so that availability probes (transformers' find_spec) see a module, not an error;
  # they still find no installed distribution of that name.
  mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
  mod.__dict__.update(attrs)
  sys.modules[name] = mod
  return mod


def _timm():
  import torch
  from torch import nn

  def to_2tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x, x)

  def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    if drop_prob == 0.0 or not training:
      return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
    mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep

  class DropPath(nn.Module):
    def __init__(self, drop_prob=None):
      super().__init__()
      self.drop_prob = drop_prob or 0.0

    def forward(self, x):
      return drop_path(x, self.drop_prob, self.training)

  layers = dict(
    trunc_normal_=nn.init.trunc_normal_, to_2tuple=to_2tuple, drop_path=drop_path, DropPath=DropPath
  )
  _module("timm")
  _module("timm.models")
  _module("timm.models.layers", **layers)
  _module("timm.models.registry", register_model=lambda fn: fn)


def _torchvision():
  def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

  _module("torchvision")
  _module("torchvision.ops")
  _module("torchvision.ops.boxes", box_area=box_area)


def _transformers():
  import torch
  from transformers import modeling_utils, pytorch_utils

  def find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned):
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned
    for head in heads:
      mask[head - sum(1 for h in already_pruned if h < head)] = 0
    index = torch.arange(len(mask.view(-1)))[mask.view(-1).eq(1)].long()
    return heads, index

  def get_parameter_dtype(module):
    return next(module.parameters()).dtype

  for name, value in dict(
    apply_chunking_to_forward=pytorch_utils.apply_chunking_to_forward,
    prune_linear_layer=pytorch_utils.prune_linear_layer,
    find_pruneable_heads_and_indices=find_pruneable_heads_and_indices,
    get_parameter_dtype=get_parameter_dtype,
  ).items():
    if not hasattr(modeling_utils, name):
      setattr(modeling_utils, name, value)

  def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    if head_mask is not None:
      raise NotImplementedError("head masks are not used by the pre-training step")
    return [None] * num_hidden_layers

  def invert_attention_mask(self, mask):
    ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    ext = ext.to(dtype=self.dtype)
    big = 1e4 if self.dtype == torch.float16 else 1e9
    return (1.0 - ext) * -big

  model = modeling_utils.PreTrainedModel
  legacy = dict(get_head_mask=get_head_mask, invert_attention_mask=invert_attention_mask)
  for name, fn in legacy.items():
    if not hasattr(model, name):
      setattr(model, name, fn)
  from transformers import optimization

  if not hasattr(optimization, "AdamW"):
    optimization.AdamW = _hf_adamw()


def _hf_adamw():
  import torch

  class AdamW(torch.optim.Optimizer):
    """Adam with bias correction, then decoupled weight decay applied after the update."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
      super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
      for group in self.param_groups:
        b1, b2 = group["betas"]
        for p in group["params"]:
          if p.grad is None:
            continue
          state = self.state[p]
          if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
          state["step"] += 1
          m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
          m.mul_(b1).add_(g, alpha=1.0 - b1)
          v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
          t = state["step"]
          step_size = group["lr"] * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
          p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)
          if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

  return AdamW


def _official_package_stand_ins():
  def unused(name):
    def fail(*args, **kwargs):
      raise NotImplementedError(f"{name} is stubbed by bench/official_shims.py (BERT only)")

    return fail

  _module(
    "models.xroberta",
    **{n: unused(n) for n in ("RobertaForMaskedLM", "RobertaModel", "RobertaConfig")},
  )

  def read_json(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)

  _module("utils", read_json=read_json)
  _module("dataset", build_tokenizer=lambda path, dropout=0: types.SimpleNamespace(pad_token_id=0))


def patch_xbert() -> None:
  """Shim 5: call after `models.xbert` is imported, before a model is built."""
  from models import xbert

  def init_weights(self):
    self.apply(self._init_weights)
    if getattr(self.config, "tie_word_embeddings", True):
      out = self.get_output_embeddings()  # None for the bare BertModel
      if out is not None:
        base = getattr(self, self.base_model_prefix, self)
        out.weight = base.get_input_embeddings().weight

  xbert.BertPreTrainedModel.init_weights = init_weights


def install(repo: str) -> None:
  """Registers every shim above and puts the official checkout first on `sys.path`."""
  for sub in ("models/model_pretrain.py", "models/xvlm.py", "models/beit2.py", "optim.py"):
    if not os.path.isfile(os.path.join(repo, sub)):
      raise SystemExit(
        f"--official_repo {repo!r} is not a checkout of zengyan-97/X2-VLM: {sub} is missing"
      )
  for name in ("models", "utils", "dataset", "optim"):
    if name in sys.modules:
      raise SystemExit(f"a module named {name!r} is already imported; run from a clean process")
  _transformers()  # first: transformers probes the real packages at import time
  _timm()
  _torchvision()
  _official_package_stand_ins()
  sys.path.insert(0, os.path.abspath(repo))
