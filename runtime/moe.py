"""The sparse mixture-of-experts pool: gate → top-k → dispatch → one GEMM per expert segment
→ combine, on Tandem's kernels.

* :func:`experts_forward` — the expert half of an MoE layer for given routing (top-k ids and
  weights): :func:`~tandem.kernels.moe_align` plans, :func:`~tandem.kernels.permute` gathers
  each expert's tokens into one contiguous segment, each expert runs two GEMMs over its segment
  (a Python loop over *experts*, never over tokens), :func:`~tandem.kernels.combine` scatters
  back with the gate weights.
* :class:`MoEBlock` — a complete layer (router + experts), weights in transformers' Mixtral
  layout (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)).
* :class:`MoEClassifier` — a classifier with one MoE layer: what ``tandem models build --moe``
  trains for the digits task. Weights travel as ``.npz`` (``allow_pickle=False``): never pickle.
* :func:`register_transformers` — adds ``"tandem"`` to transformers' experts interface, so an
  existing Mixtral/Qwen-MoE model switches with one line:
  ``model.set_experts_implementation("tandem")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels import combine, moe_align, permute, topk_gating
from tandem.kernels.linear import SKINNY_MAX_ROWS, skinny_linear
from tandem.runtime.errors import BackendError

# Tokens per block in the dispatch plan. On CPU the GEMMs run per expert segment and skip the
# padding, so the block only sets how much padding permute writes; 16 is what GPU kernels use.
BLOCK_SIZE = 16


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, with gate the first half of the last axis (Mixtral's layout)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def experts_forward(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    activation: Callable[[torch.Tensor], torch.Tensor] = swiglu,
    transposed: bool = False,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Run each token (T, H) through its top-k experts and sum the outputs with ``weights``.

    ``gate_up_proj`` is (E, 2I, H) and ``down_proj`` (E, H, I) — or (E, H, 2I) / (E, I, H) when
    ``transposed``. Returns (T, H) in ``hidden``'s dtype.
    """
    n_experts = gate_up_proj.shape[0]
    plan = moe_align(expert_ids, n_experts, block_size)
    xp = permute(hidden, plan)
    yp = torch.empty(plan.num_tokens_post_padded, hidden.shape[-1], dtype=hidden.dtype)
    segments = [
        (e, start, count)
        for e, (start, count) in enumerate(
            zip(plan.expert_offsets[:-1].tolist(), plan.expert_counts.tolist(), strict=True)
        )
        if count
    ]
    run_segments(xp, yp, segments, gate_up_proj, down_proj, activation, transposed)
    return combine(yp, plan, weights)


def run_segments(
    xp: torch.Tensor,
    yp: torch.Tensor,
    segments: list[tuple[int, int, int]],
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor] = swiglu,
    transposed: bool = False,
) -> None:
    """For each ``(expert, start, count)``: ``yp[start:start+count] = expert(xp[same rows])`` —
    two GEMMs over the segment. The loop is over experts; the rows of a segment go together.
    Segments of at most :data:`~tandem.kernels.linear.SKINNY_MAX_ROWS` rows use the skinny
    kernel (weights streamed once), larger ones torch's GEMM."""
    skinny = not transposed and xp.dtype == torch.float32 and not torch.is_grad_enabled()
    for e, start, count in segments:
        seg = xp[start : start + count]
        if skinny and count <= SKINNY_MAX_ROWS:  # a few tokens: stream the weights once
            h = activation(torch.from_numpy(skinny_linear(seg.numpy(), gate_up_proj[e].numpy())))
            skinny_linear(h.numpy(), down_proj[e].numpy(), out=yp[start : start + count].numpy())
        elif transposed:
            h = activation(seg @ gate_up_proj[e])
            torch.matmul(h, down_proj[e], out=yp[start : start + count])
        else:
            h = activation(F.linear(seg, gate_up_proj[e]))
            torch.matmul(h, down_proj[e].t(), out=yp[start : start + count])


class MoEBlock(nn.Module):
    """An MoE layer: a linear router, ``topk_gating``, and ``n_experts`` SwiGLU experts."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        n_experts: int,
        k: int,
        activation: str = "swiglu",
        *,
        scoring: str = "softmax",
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        if activation != "swiglu":
            raise ValueError(f"activation {activation!r} is not supported (only 'swiglu')")
        self.k = k
        self.scoring = scoring
        self.renormalize = renormalize
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, intermediate))
        for p in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(p, std=hidden**-0.5)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (T, k), expert ids (T, k)) for tokens (T, H)."""
        return topk_gating(self.gate(x), self.k, scoring=self.scoring, renormalize=self.renormalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tandem's kernels; while training with gradients on, the differentiable torch path
        (:func:`moe_block_reference`): the Numba kernels have no backward."""
        if torch.is_grad_enabled() and self.training:
            return moe_block_reference(self, x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.route(flat)
        out = experts_forward(flat, ids, weights, self.gate_up_proj, self.down_proj)
        return out.reshape(shape)


def moe_block_reference(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """The straightforward torch MoE: softmax, topk, a dense loop over experts with masks."""
    if block.scoring != "softmax":
        raise NotImplementedError("the reference block scores with softmax")
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(block.gate(flat).float(), dim=-1)
    w, ids = torch.topk(probs, block.k, dim=-1)
    if block.renormalize:
        w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for e in range(block.gate_up_proj.shape[0]):
        tok, slot = torch.where(ids == e)
        if len(tok):
            h = swiglu(F.linear(flat[tok], block.gate_up_proj[e]))
            out = out.index_add(0, tok, F.linear(h, block.down_proj[e]) * w[tok, slot, None])
    return out.reshape(x.shape)


def tandem_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' experts-interface signature, on Tandem's dispatch and combine kernels.

    Works for experts modules decorated with ``use_experts_implementation`` (Mixtral,
    Qwen-MoE…): concatenated gate/up weights, optional transposed layout, no biases.
    """
    if getattr(self, "has_bias", False):
        raise NotImplementedError("the tandem experts implementation has no expert biases yet")
    if getattr(self, "has_gate", True):
        weight, act = self.gate_up_proj, self._apply_gate
    else:
        weight, act = self.up_proj, self.act_fn
    with torch.no_grad():
        out = experts_forward(
            hidden_states,
            top_k_index,
            top_k_weights,
            weight,
            self.down_proj,
            activation=act,
            transposed=getattr(self, "is_transposed", False),
        )
    return out.to(hidden_states.dtype)


_CONFIG_KEYS = ("in_features", "hidden", "intermediate", "n_experts", "k", "n_classes")


class MoEClassifier(nn.Module):
    """in → Linear+ReLU → h + MoE(h) → Linear → class logits."""

    def __init__(
        self,
        in_features: int,
        hidden: int,
        intermediate: int,
        n_experts: int,
        k: int,
        n_classes: int,
    ) -> None:
        super().__init__()
        self.config = dict(
            zip(
                _CONFIG_KEYS,
                (in_features, hidden, intermediate, n_experts, k, n_classes),
                strict=True,
            )
        )
        self.embed = nn.Linear(in_features, hidden)
        self.moe = MoEBlock(hidden, intermediate, n_experts, k)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.embed(x))
        return self.head(h + self.moe(h))

    def save(self, path: str | Path) -> None:
        arrays = {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}
        with open(path, "wb") as f:  # np.savez would append ".npz" to a bare path
            np.savez(f, config=np.array([self.config[k] for k in _CONFIG_KEYS]), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> MoEClassifier:
        try:
            with np.load(path, allow_pickle=False) as z:
                model = cls(*(int(v) for v in z["config"]))
                state = {k: torch.from_numpy(z[k].copy()) for k in z.files if k != "config"}
        except (OSError, KeyError, ValueError) as e:
            raise BackendError(f"cannot load MoE model {path}: {e}") from None
        model.load_state_dict(state)
        return model.eval()


def register_transformers() -> None:
    """Register ``"tandem"`` in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``.
    Idempotent; called on import of this module when transformers is installed."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("tandem", tandem_experts_forward)


with contextlib.suppress(ImportError):  # transformers is optional
    register_transformers()
