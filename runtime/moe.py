"""The sparse mixture-of-experts pool: gate → top-k → dispatch → one GEMM per expert segment
→ combine, on Tandem's kernels.

* :func:`experts_forward` — the expert half of an MoE layer for given routing (top-k ids and
  weights). Tandem's formulation: :func:`~tandem.kernels.moe_align` plans,
  :func:`~tandem.kernels.permute` gathers each expert's tokens into one contiguous segment,
  each expert runs two GEMMs over its segment (a Python loop over *experts*, never over
  tokens), :func:`~tandem.kernels.combine` scatters back with the gate weights. Beside it, the
  torch formulations transformers uses (a per-expert loop with ``index_add_``; ``grouped_mm``):
  per token bucket, :mod:`~tandem.kernels.autotune` times them on this machine and the fastest
  runs, so the block is never slower than the library's own on a CPU the kernels were not
  tuned on (an Intel Xeon with AVX-512 ran the kernels at 1.3–1.7× transformers' time).
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

from tandem.kernels import autotune, combine, moe_align, permute, topk_gating
from tandem.kernels.linear import SKINNY_MAX_ROWS, linear
from tandem.runtime.errors import BackendError

# Tokens per block in the dispatch plan. On CPU the GEMMs run per expert segment and skip the
# padding, so the block only sets how much padding permute writes; 16 is what GPU kernels use.
BLOCK_SIZE = 16


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, with gate the first half of the last axis (Mixtral's layout)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# Token buckets of :func:`experts_forward`'s shape classes, (first, last) tokens; above the last
# bucket, one class. Decode (1), speculative verification and small batches (2–4, 5–16), then
# prefill sizes: where per-call overhead stops mattering and the GEMMs' shape takes over.
TOKEN_BUCKETS = ((1, 1), (2, 4), (5, 16), (17, 64), (65, 256), (257, 1024))
_TOKEN_CLASS = (-1, *(i for i, (lo, hi) in enumerate(TOKEN_BUCKETS) for _ in range(lo, hi + 1)))
_LARGE = len(TOKEN_BUCKETS)
_LARGE_TOKENS = TOKEN_BUCKETS[-1][1] + 1

ExpertsImpl = Callable[..., torch.Tensor]


def token_class_label(n_tokens: int) -> str:
    """The token bucket of ``n_tokens`` as autotune's choices name it (``"T=5-16"``)."""
    token_class = _TOKEN_CLASS[n_tokens] if n_tokens < _LARGE_TOKENS else _LARGE
    if token_class == _LARGE:
        return f"T>{_LARGE_TOKENS - 1}"
    lo, hi = TOKEN_BUCKETS[token_class]
    return f"T={lo}" if lo == hi else f"T={lo}-{hi}"


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

    Runs whichever of :data:`IMPLEMENTATIONS` :mod:`~tandem.kernels.autotune` found fastest on
    this machine for T's bucket (:data:`TOKEN_BUCKETS`) and these shapes, timed on the first
    call of each class (op ``"moe_experts"``): Tandem's dispatch/combine kernels, Tandem's
    rows formulation for small batches (no plan), torch's per-expert loop with ``index_add_``
    (transformers' "eager"), or ``grouped_mm`` (transformers' "grouped_mm"). All give the same numbers up to float32 summation order.
    With gradients wanted, the differentiable torch loop, untimed.
    """
    n_tokens = hidden.shape[0]
    if n_tokens == 0:
        return torch.zeros_like(hidden)
    if torch.is_grad_enabled() and (
        hidden.requires_grad or gate_up_proj.requires_grad or down_proj.requires_grad
    ):
        return _experts_torch_loop(
            hidden, expert_ids, weights, gate_up_proj, down_proj, activation, transposed
        )
    token_class = _TOKEN_CLASS[n_tokens] if n_tokens < _LARGE_TOKENS else _LARGE
    key = (
        token_class,
        tuple(gate_up_proj.shape),
        tuple(down_proj.shape),
        expert_ids.shape[1],
        transposed,
        hidden.dtype,
        hidden.device.type,
    )
    impl = _chosen.get(key)
    if impl is None:
        impl = _tune_experts(
            key, hidden, expert_ids, weights, gate_up_proj, down_proj, activation, transposed
        )
    return impl(
        hidden, expert_ids, weights, gate_up_proj, down_proj, activation, transposed, block_size
    )


def _tune_experts(
    key: tuple,
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    transposed: bool,
) -> ExpertsImpl:
    """Time every formulation on this call's own inputs (representative routing included)."""
    label = token_class_label(hidden.shape[0])
    n_exp, h = gate_up_proj.shape[0], hidden.shape[1]
    inter = down_proj.shape[1] if transposed else down_proj.shape[2]
    on_gpu = hidden.device.type == "cuda"
    candidates = [
        name
        for name in IMPLEMENTATIONS
        if name != "tandem_rows"
        or (
            hidden.shape[0] <= ROWS_MAX_TOKENS
            and hidden.dtype == torch.float32
            and hidden.device.type == "cpu"
        )
    ]

    def run(impl: ExpertsImpl) -> Callable[[], object]:
        def once() -> object:
            out = impl(hidden, expert_ids, weights, gate_up_proj, down_proj, activation, transposed)
            if on_gpu:
                torch.cuda.synchronize()
            return out

        return once

    with torch.no_grad():
        winner = autotune.choose(
            "moe_experts",
            (
                label,
                f"E={n_exp}",
                f"H={h}",
                f"I={inter}",
                f"k={expert_ids.shape[1]}",
                str(hidden.dtype).removeprefix("torch."),
                *(["transposed"] if transposed else []),
                *([hidden.device.type] if hidden.device.type != "cpu" else []),
            ),
            {name: run(IMPLEMENTATIONS[name]) for name in candidates},
        )
    impl = IMPLEMENTATIONS[winner]
    _chosen[key] = impl
    return impl


def _experts_tandem(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor] = swiglu,
    transposed: bool = False,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Tandem's kernels: :func:`~tandem.kernels.moe_align` plans, :func:`~tandem.kernels.permute`
    gathers each expert's tokens into one segment, two GEMMs per segment
    (:func:`run_segments`), :func:`~tandem.kernels.combine` scatters back with the weights."""
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
    Segments of at most :data:`~tandem.kernels.linear.SKINNY_MAX_ROWS` rows go through
    :func:`~tandem.kernels.linear.linear` (the skinny kernel or BLAS, whichever autotune found
    faster here), larger ones torch's GEMM."""
    skinny = not transposed and xp.dtype == torch.float32 and not torch.is_grad_enabled()
    for e, start, count in segments:
        seg = xp[start : start + count]
        if skinny and count <= SKINNY_MAX_ROWS:  # a few tokens: stream the weights once
            h = activation(torch.from_numpy(linear(seg.numpy(), gate_up_proj[e].numpy())))
            linear(h.numpy(), down_proj[e].numpy(), out=yp[start : start + count].numpy())
        elif transposed:
            h = activation(seg @ gate_up_proj[e])
            torch.matmul(h, down_proj[e], out=yp[start : start + count])
        else:
            h = activation(F.linear(seg, gate_up_proj[e]))
            torch.matmul(h, down_proj[e].t(), out=yp[start : start + count])


def _experts_tandem_rows(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor] = swiglu,
    transposed: bool = False,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """Small batches (float32, CPU): no plan, no permute, no combine — per expert hit, its rows
    gathered in numpy, two :func:`~tandem.kernels.linear.linear` GEMMs, the weighted rows added
    in place. At a decode step the fixed cost of the three dispatch kernels (and their torch ↔
    numpy hops) is a visible share of the call; here it is a few numpy operations."""
    if hidden.dtype != torch.float32 or hidden.device.type != "cpu":
        raise TypeError("the rows formulation runs float32 CPU tensors")
    x = hidden.detach().numpy()
    ids = expert_ids.detach().cpu().numpy()
    w = weights.detach().to(torch.float32).numpy()
    n_experts = gate_up_proj.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
        raise ValueError(f"expert ids must lie in [0, {n_experts})")
    out = np.zeros_like(x)
    for e in np.unique(ids).tolist():
        rows, slots = np.nonzero(ids == e)  # a token picks an expert once: rows are distinct
        xe = x[rows]
        up, down = gate_up_proj[e].detach().numpy(), down_proj[e].detach().numpy()
        h = xe @ up if transposed else linear(xe, up)
        a = activation(torch.from_numpy(h)).numpy()
        y = a @ down if transposed else linear(a, down)
        out[rows] += y * w[rows, slots, None]
    return torch.from_numpy(out)


def _expert_counts(flat_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Slots per expert; ids outside [0, E) raise ``ValueError`` (as ``moe_align`` does)."""
    if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= n_experts):
        raise ValueError(f"expert ids must lie in [0, {n_experts})")
    return torch.bincount(flat_ids, minlength=n_experts)


def _project(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x @ w if transposed else F.linear(x, w)


def _experts_torch_loop(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor] = swiglu,
    transposed: bool = False,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """transformers' "eager" experts in plain torch: per expert hit, gather its tokens, two
    GEMMs, ``index_add_`` the weighted rows back. Differentiable."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1).long()
    counts = _expert_counts(flat, gate_up_proj.shape[0]).tolist()
    order = torch.argsort(flat, stable=True)
    w_slots = weights.reshape(-1)
    out = torch.zeros_like(hidden)
    start = 0
    for e, count in enumerate(counts):
        if not count:
            continue
        slots = order[start : start + count]
        start += count
        tokens = slots // k
        h = activation(_project(hidden[tokens], gate_up_proj[e], transposed))
        y = _project(h, down_proj[e], transposed) * w_slots[slots, None].to(hidden.dtype)
        out.index_add_(0, tokens, y)
    return out


def _experts_grouped_mm(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor] = swiglu,
    transposed: bool = False,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """transformers' "grouped_mm" experts: slots sorted by expert, one grouped GEMM per
    projection over all experts' segments, back to slot order, summed over k in slot order."""
    n_tokens, k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    offsets = torch.cumsum(_expert_counts(flat, gate_up_proj.shape[0]), 0, dtype=torch.int32)
    order = torch.argsort(flat, stable=True)
    up = gate_up_proj if transposed else gate_up_proj.transpose(1, 2)
    down = down_proj if transposed else down_proj.transpose(1, 2)
    h = activation(_grouped_mm(hidden[order // k], up, offs=offsets))
    y = _grouped_mm(h, down, offs=offsets) * weights.reshape(-1)[order, None].to(hidden.dtype)
    slots = torch.empty_like(y)
    slots[order] = y
    return slots.view(n_tokens, k, -1).sum(1)


_grouped_mm: Callable[..., torch.Tensor] | None = getattr(
    F, "grouped_mm", getattr(torch, "_grouped_mm", None)
)

# Candidate formulations, by autotune name ("tandem…" is Tandem's side, the rest the library).
IMPLEMENTATIONS: dict[str, ExpertsImpl] = {
    "tandem": _experts_tandem,
    "tandem_rows": _experts_tandem_rows,
    "torch_loop": _experts_torch_loop,
    **({"torch_grouped_mm": _experts_grouped_mm} if _grouped_mm is not None else {}),
}
# The rows formulation is a candidate up to this many tokens (float32 on the CPU): beyond it the
# per-expert gathers cost what the dispatch kernels save (the "block tandem_rows" column of
# ``python -m benchmarks.kernels.moe``: level with "block tandem" from T = 16 to 256).
ROWS_MAX_TOKENS = 64
# (token class, shapes, k, layout, dtype, device) → the chosen formulation (autotune's memo)
_chosen: dict[tuple, ExpertsImpl] = {}
autotune.on_reset(_chosen.clear)


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
