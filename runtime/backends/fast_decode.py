"""A lean decode path for transformers' Llama, Mistral, Qwen2 and Mixtral causal LMs, on the
model's own weights.

transformers' forward spends most of a batch-1 decode step in Python: cache objects, mask
builders, output dataclasses, hooks, one torch dispatch per small op. :class:`FastDecoder` runs
the same arithmetic over views of the model's parameters (nothing is copied), and
:class:`FastSession` is a :class:`~tandem.runtime.generation.LogitsSession` with a **static KV
cache**: two (layers, kv_heads, n_ctx, head_dim) tensors allocated once per session.

Per layer: RMSNorm → q/k/v projections → RoPE (transformers' rotate-half layout, cos/sin tables
precomputed once by the model's own rotary module) → k/v written into the cache → attention of
the new tokens against the cache (GQA without repeating k/v) → o projection added to the
residual → RMSNorm → the MLP (Llama, Mistral, Qwen2) or the router and experts (Mixtral:
softmax → top-k → renormalise, as ``MixtralTopKRouter`` does). Projection biases (Qwen2's q/k/v,
Llama's ``attention_bias``/``mlp_bias``) are added where the model has them; a sliding window
(Mistral) masks keys older than the window. A model whose layers mix full and sliding-window
attention is not taken.

* :meth:`FastDecoder.step` / :meth:`FastDecoder.batch` — the decode step, of one sequence or
  of several at once (the worker's engine): numpy around :func:`~tandem.kernels.linear.linear`
  for every projection and the k selected experts — Tandem's skinny kernel or BLAS, whichever
  is faster on this machine for that shape and row count (autotuned at warm-up:
  :meth:`FastDecoder.tune`); a numpy op costs a fraction of a torch dispatch at these sizes.
  This is what decode speed is made of.
* :meth:`FastDecoder.forward` — T tokens, the prefill: torch ops, ``scaled_dot_product_attention``
  with a causal (or sliding-window) mask, the experts through
  :func:`tandem.runtime.moe.experts_forward` (dispatch, one GEMM per expert segment, combine).

Both match transformers' forward to float32 rounding at every step
(``tests/runtime/test_fast_decode.py``). :func:`unsupported_reason` says why a model cannot
take this path; the backend then falls back to transformers' forward.

(Over 500 lines: the numpy step, its batched form for the worker's engine and the torch
prefill are one model's arithmetic over the same weight views and tables.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tandem.kernels.linear import SKINNY_MAX_ROWS, linear, tune_linear
from tandem.runtime.errors import BadRequest
from tandem.runtime.moe import experts_forward

ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "MixtralForCausalLM",
)
# Caches and RoPE tables are sized for min(max_position_embeddings, this) tokens unless a
# larger n_ctx is asked for: a long-context config (Mixtral's default is 131072) would
# otherwise pin hundreds of MB of cos/sin tables.
DEFAULT_MAX_CTX = 8192


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """None if :class:`FastDecoder` can run ``model``, else why not (for a log line)."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        return f"{name} is not one of {', '.join(ARCHITECTURES)}"
    cfg = model.config
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if "dynamic" in rope_type or rope_type == "longrope":
        return f"RoPE type {rope_type!r} changes with the sequence length"
    if sliding_window(cfg) == MIXED:
        return "its layers mix full and sliding-window attention"
    params = list(model.parameters())
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        return "the fast path runs float32 weights on the CPU"
    if name == "MixtralForCausalLM":
        experts = model.model.layers[0].mlp.experts
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
            return "experts with biases or a transposed layout"
    return None


@dataclass(frozen=True, slots=True)
class _Linear:
    """``x @ w.T + b`` on views of a linear layer's parameters (no copies): numpy rows through
    :func:`~tandem.kernels.linear.linear` (the skinny kernel or BLAS, as autotuned); torch rows
    (the prefill) up to :data:`~tandem.kernels.linear.SKINNY_MAX_ROWS` the same way, more
    through torch's GEMM."""

    w: torch.Tensor
    w_np: np.ndarray
    b: torch.Tensor | None = None
    b_np: np.ndarray | None = None

    @classmethod
    def of(cls, w: torch.Tensor, b: torch.Tensor | None = None) -> _Linear:
        w = w.detach()
        if b is None:
            return cls(w, w.numpy())
        b = b.detach()
        return cls(w, w.numpy(), b, b.numpy())

    def gemv(self, x: np.ndarray) -> np.ndarray:
        """The numpy path: float32 ``x`` (R, K) → (R, N)."""
        y = linear(x, self.w_np)
        if self.b_np is not None:
            y += self.b_np
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > SKINNY_MAX_ROWS:
            return F.linear(x, self.w, self.b)
        y = torch.from_numpy(linear(x.numpy(), self.w_np))
        return y if self.b is None else y.add_(self.b)


@dataclass(frozen=True, slots=True)
class _Layer:
    """One decoder layer's parameters, as views that share the model's storage."""

    attn_norm: torch.Tensor
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    mlp_norm: torch.Tensor
    attn_norm_np: np.ndarray
    mlp_norm_np: np.ndarray
    # Llama: the gate, up and down projections
    mlp: tuple[_Linear, _Linear, _Linear] | None = None
    # Mixtral: the router, all experts' gate_up_proj (E, 2I, H) and down_proj (E, H, I), and
    # each expert's two matrices as numpy views for the skinny kernel
    router: _Linear | None = None
    gate_up_proj: torch.Tensor | None = None
    down_proj: torch.Tensor | None = None
    gate_up_np: tuple[np.ndarray, ...] = ()
    down_np: tuple[np.ndarray, ...] = ()


def _linear(m: torch.nn.Module) -> _Linear:
    return _Linear.of(m.weight, m.bias)


def _layer(block: torch.nn.Module) -> _Layer:
    attn, mlp = block.self_attn, block.mlp
    attn_norm = block.input_layernorm.weight.detach()
    mlp_norm = block.post_attention_layernorm.weight.detach()
    common = dict(
        attn_norm=attn_norm,
        q=_linear(attn.q_proj),
        k=_linear(attn.k_proj),
        v=_linear(attn.v_proj),
        o=_linear(attn.o_proj),
        mlp_norm=mlp_norm,
        attn_norm_np=attn_norm.numpy(),
        mlp_norm_np=mlp_norm.numpy(),
    )
    if not hasattr(mlp, "experts"):
        return _Layer(
            **common, mlp=(_linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj))
        )
    gate_up, down = mlp.experts.gate_up_proj.detach(), mlp.experts.down_proj.detach()
    return _Layer(
        **common,
        router=_Linear.of(mlp.gate.weight),
        gate_up_proj=gate_up,
        down_proj=down,
        gate_up_np=tuple(w.numpy() for w in gate_up),
        down_np=tuple(w.numpy() for w in down),
    )


class FastDecoder:
    """A ``LlamaForCausalLM`` / ``MixtralForCausalLM`` without transformers' forward.

    Holds views of the model's weights and the RoPE tables for ``n_ctx`` positions (default
    min(max_position_embeddings, :data:`DEFAULT_MAX_CTX`)); the model must stay alive and
    unchanged. Thread-safe: each :class:`FastSession` owns its cache, the weights are only
    read. Raises ``ValueError`` for a model :func:`unsupported_reason` refuses.
    """

    def __init__(self, model: torch.nn.Module, *, n_ctx: int | None = None) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"no fast decode path: {reason}")
        cfg = model.config
        self.model = model
        self.arch = type(model).__name__
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden = cfg.hidden_size
        self.n_vocab = cfg.vocab_size
        self.eps = float(cfg.rms_norm_eps)
        self.n_ctx = n_ctx or min(int(cfg.max_position_embeddings), DEFAULT_MAX_CTX)
        window = sliding_window(cfg)
        assert window != MIXED
        self.window: int | None = window
        self.top_k = int(getattr(cfg, "num_experts_per_tok", 0))
        base = model.model
        self.layers = [_layer(b) for b in base.layers[: cfg.num_hidden_layers]]
        self.embed = base.embed_tokens.weight.detach()
        self.norm = base.norm.weight.detach()
        self.lm_head = _linear(model.lm_head)
        self.act = _activation(cfg.hidden_act)
        with torch.inference_mode():
            pos = torch.arange(self.n_ctx)[None]
            cos, sin = base.rotary_emb(self.embed[:1], position_ids=pos)
        half = self.head_dim // 2
        # rotate_half(x) * sin == swap_halves(x) * [-sin_lo, sin_hi]: one flip, no negation
        self.cos = cos[0, :, None].contiguous()  # (n_ctx, 1, head_dim)
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)[:, None].contiguous()
        # the one-token path in numpy: tables (n_ctx, 2, head_dim / 2) for x viewed as halves
        self.cos_np = self.cos.numpy().reshape(self.n_ctx, 2, half)
        self.sin_np = self.sin.numpy().reshape(self.n_ctx, 2, half)
        self.embed_np = self.embed.numpy()
        self.norm_np = self.norm.numpy()
        self.scale = self.head_dim**-0.5

    def tune(self, rows: Sequence[int]) -> dict[str, str]:
        """Choose, per weight shape and row bucket in ``rows``, between the skinny kernel and
        BLAS on this machine (:func:`~tandem.kernels.linear.tune_linear`): what the first step
        of each size would otherwise do. Returns the choices."""
        weights: dict[tuple[int, ...], np.ndarray] = {}
        for ly in self.layers:
            mats = [ly.q.w_np, ly.k.w_np, ly.v.w_np, ly.o.w_np]
            mats += [m.w_np for m in ly.mlp or ()] + ([ly.router.w_np] if ly.router else [])
            mats += [*ly.gate_up_np[:1], *ly.down_np[:1]]
            for w in mats:
                weights.setdefault(w.shape, w)
        weights.setdefault(self.lm_head.w_np.shape, self.lm_head.w_np)
        return tune_linear(list(weights.values()), rows)

    def session(self, n_ctx: int | None = None) -> FastSession:
        """A new sequence with a static cache for ``n_ctx`` tokens (at most the decoder's)."""
        n = self.n_ctx if n_ctx is None else min(n_ctx, self.n_ctx)
        return FastSession(self, n)

    def step(self, token: int, pos: int, k_cache: np.ndarray, v_cache: np.ndarray) -> np.ndarray:
        """Run one token at position ``pos``: the decode step. Returns the logits (n_vocab,)."""
        return self.steps([token], pos, k_cache, v_cache)[0]

    def steps(
        self, tokens: Sequence[int], pos: int, k_cache: np.ndarray, v_cache: np.ndarray
    ) -> np.ndarray:
        """Run a few tokens (a decode step, or a speculative draft to verify) at positions
        ``pos, pos + 1, ...``: :meth:`batch` for one sequence; the logits after each token,
        (T, n_vocab)."""
        return self.batch([(k_cache, v_cache, pos, tokens, len(tokens))])[0]

    def batch(self, work: Sequence[BatchRun]) -> list[np.ndarray]:
        """Several sequences in one pass, each ``(k_cache, v_cache, pos, tokens, n_rows)``: its
        caches (layers, kv_heads, n_ctx, head_dim), where its new ``tokens`` start, and how many
        logits rows it wants (those after its last ``n_rows`` tokens). In numpy: every
        projection, the router and each selected expert run once over the rows of all the
        sequences together (each weight row streamed once per step, whatever the batch: why a
        step of 8 decode rows costs little more than one), attention runs per sequence against
        its own cache. Same arithmetic and caches as :meth:`forward`; returns each sequence's
        rows, (n_rows, n_vocab)."""
        nkv, hd, eps = self.n_kv_heads, self.head_dim, self.eps
        group = self.n_heads // nkv
        spans, positions, ids = [], [], []
        for _, _, pos, tokens, _ in work:
            t = len(tokens)
            lo = 0 if self.window is None else max(0, pos - self.window + 1)
            mask = None if t == 1 else self._visible_np(pos, t, lo)
            spans.append((len(ids), len(ids) + t, pos, lo, mask))
            positions.extend(range(pos, pos + t))
            ids.extend(tokens)
        r = len(ids)
        cos, sin = self.cos_np[positions, None], self.sin_np[positions, None]  # (R, 1, 2, hd/2)
        x = self.embed_np[ids]  # (R, H), a copy
        a = np.empty((r, self.n_heads * hd), np.float32)
        for i, ly in enumerate(self.layers):
            h = _rms_np(x, ly.attn_norm_np, eps)
            q = _rope_np(ly.q.gemv(h), cos, sin).reshape(r, nkv, group * hd)
            k = _rope_np(ly.k.gemv(h), cos, sin).reshape(r, nkv, hd)
            v = ly.v.gemv(h).reshape(r, nkv, hd)
            for (k_cache, v_cache, *_), (s0, s1, pos, lo, mask) in zip(work, spans, strict=True):
                t, end = s1 - s0, pos + s1 - s0
                k_cache[i, :, pos:end] = k[s0:s1].swapaxes(0, 1)
                v_cache[i, :, pos:end] = v[s0:s1].swapaxes(0, 1)
                qs = q[s0:s1].swapaxes(0, 1).reshape(nkv, t * group, hd)
                s = np.matmul(qs, k_cache[i, :, lo:end].transpose(0, 2, 1))  # (nkv, T·group, L)
                s *= self.scale
                if mask is not None:
                    s.reshape(nkv, t, group, -1)[...] += mask
                s -= s.max(-1, keepdims=True)
                np.exp(s, out=s)
                s /= s.sum(-1, keepdims=True)
                o = np.matmul(s, v_cache[i, :, lo:end])  # (nkv, T·group, hd)
                a[s0:s1] = o.reshape(nkv, t, group * hd).swapaxes(0, 1).reshape(t, -1)
            x += ly.o.gemv(a)
            h = _rms_np(x, ly.mlp_norm_np, eps)
            if ly.mlp is not None:
                gate, up, down = ly.mlp
                x += down.gemv(self._act_np(gate.gemv(h)) * up.gemv(h))
            else:
                self._moe_np(ly, h, x)
        wanted = [x[s1 - item[4] : s1] for item, (_, s1, *_) in zip(work, spans, strict=True)]
        logits = self.lm_head.gemv(_rms_np(np.concatenate(wanted), self.norm_np, eps))
        return np.split(logits, np.cumsum([len(w) for w in wanted[:-1]]))

    def _visible_np(self, pos: int, t: int, lo: int) -> np.ndarray:
        """(T, 1, keys): 0 where each of T new tokens sees a cached key from ``lo``, −inf where
        it does not (causal, and the sliding window)."""
        qpos = np.arange(pos, pos + t)[:, None]
        kpos = np.arange(lo, pos + t)[None]
        mask = kpos <= qpos
        if self.window is not None:
            mask &= kpos > qpos - self.window
        return np.where(mask, np.float32(0), np.float32(-np.inf))[:, None]

    def _act_np(self, x: np.ndarray) -> np.ndarray:
        return self.act(torch.from_numpy(x)).numpy()

    def _moe_np(self, ly: _Layer, h: np.ndarray, x: np.ndarray) -> None:
        """T tokens' experts added to ``x`` (T, H), in place; routing as :meth:`_moe`. Each
        selected expert runs once, on the rows that chose it."""
        logits = ly.router.gemv(h)  # (T, E)
        ids = np.argsort(-logits, axis=1, kind="stable")[:, : self.top_k]
        top = np.take_along_axis(logits, ids, 1)
        w = np.exp(top - top[:, :1])
        w /= w.sum(1, keepdims=True)
        inter = ly.down_np[0].shape[1]
        if len(h) == 1:  # the decode step: no grouping
            for e, we in zip(ids[0].tolist(), w[0].tolist(), strict=True):
                gate_up = linear(h, ly.gate_up_np[e])
                a = self._act_np(gate_up[:, :inter]) * gate_up[:, inter:]
                x += linear(a, ly.down_np[e]) * we
            return
        for e in np.unique(ids).tolist():
            rows, slots = np.nonzero(ids == e)
            gate_up = linear(h[rows], ly.gate_up_np[e])
            a = self._act_np(gate_up[:, :inter]) * gate_up[:, inter:]
            x[rows] += linear(a, ly.down_np[e]) * w[rows, slots][:, None]

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        start: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        rows: int | None = None,
    ) -> torch.Tensor:
        """Run tokens ``ids`` (T,) at positions ``start..start+T-1`` against the caches
        (layers, kv_heads, n_ctx, head_dim), writing their keys and values there; the logits
        (n_vocab,) after the last one, or with ``rows`` those after each of the last ``rows``
        tokens, (rows, n_vocab) (speculative verification scores every draft token in one
        pass)."""
        t = ids.shape[0]
        end = start + t
        lo, mask = self._visible(start, t)
        cos, sin = self.cos[start:end], self.sin[start:end]
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        gqa = nh != nkv
        x = F.embedding(ids, self.embed)  # (T, H)
        for i, ly in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), ly.attn_norm, self.eps)
            q = _rope(ly.q(h).view(t, nh, hd), cos, sin)
            k_cache[i, :, start:end] = _rope(ly.k(h).view(t, nkv, hd), cos, sin).transpose(0, 1)
            v_cache[i, :, start:end] = ly.v(h).view(t, nkv, hd).transpose(0, 1)
            a = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k_cache[i, None, :, lo:end],
                v_cache[i, None, :, lo:end],
                attn_mask=mask,
                enable_gqa=gqa,
            )  # (1, nh, T, hd)
            x.add_(ly.o(a[0].transpose(0, 1).reshape(t, nh * hd)))
            h = F.rms_norm(x, (self.hidden,), ly.mlp_norm, self.eps)
            if ly.mlp is not None:
                gate, up, down = ly.mlp
                x.add_(down(self.act(gate(h)).mul_(up(h))))
            else:
                self._moe(ly, h, x)
        x = F.rms_norm(x[-(rows or 1) :], (self.hidden,), self.norm, self.eps)
        logits = self.lm_head(x)
        return logits if rows else logits[0]

    def _visible(self, start: int, t: int) -> tuple[int, torch.Tensor | None]:
        """The first cache position any of the T new tokens sees, and the (T, keys) boolean
        mask (None when every query sees every key from there: one token)."""
        end = start + t
        w = self.window
        lo = 0 if w is None else max(0, start - w + 1)
        if t == 1:
            return lo, None
        qpos = torch.arange(start, end)[:, None]
        kpos = torch.arange(lo, end)[None]
        mask = kpos <= qpos
        if w is not None:
            mask &= kpos > qpos - w
        return lo, mask

    def _moe(self, ly: _Layer, h: torch.Tensor, x: torch.Tensor) -> None:
        """Add the experts' weighted sum for tokens ``h`` (T, H) to ``x``, in place. Routing
        as Mixtral's: the top-k of softmax(router logits) renormalised to sum to 1, which is
        the softmax of the top-k logits."""
        top, ids = torch.topk(ly.router(h), self.top_k, -1)
        w = torch.softmax(top, -1)
        act = _gated(self.act)
        x.add_(experts_forward(h, ids, w, ly.gate_up_proj, ly.down_proj, activation=act))


class FastSession:
    """One sequence on a :class:`FastDecoder`: a static KV cache of ``n_ctx`` positions.

    ``prefill`` keeps the cached prefix it shares with the new prompt and runs only the rest
    (at least the last token, whose logits it returns): re-prefilling ``prompt + answer`` after
    a hand-off, or a shorter prompt to roll back, costs only the new tokens. A prompt or an
    ``append`` past ``n_ctx`` raises :class:`BadRequest`; the cache is never overrun.
    ``extend``/``truncate`` are the :class:`~tandem.runtime.generation.SessionLease` side
    (several rows at once, roll back); ``close`` runs the release callback the backend set.
    """

    def __init__(self, decoder: FastDecoder, n_ctx: int) -> None:
        shape = (len(decoder.layers), decoder.n_kv_heads, n_ctx, decoder.head_dim)
        self.decoder = decoder
        self.n_ctx = n_ctx
        self.k_cache = torch.empty(shape)
        self.v_cache = torch.empty(shape)
        self.k_np, self.v_np = self.k_cache.numpy(), self.v_cache.numpy()  # same storage
        self.tokens: list[int] = []
        self.nbytes = self.k_cache.nbytes + self.v_cache.nbytes
        self.release: Callable[[], None] | None = None

    @property
    def cached_tokens(self) -> list[int]:
        return self.tokens

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise BadRequest("prefill needs at least one token")
        if len(tokens) > self.n_ctx:
            raise BadRequest(f"prompt of {len(tokens)} tokens exceeds the context of {self.n_ctx}")
        keep = 0
        for a, b in zip(self.tokens, tokens[:-1], strict=False):
            if a != b:
                break
            keep += 1
        del self.tokens[keep:]
        return self._run(tokens[keep:], 1)[0]

    def append(self, token: int) -> np.ndarray:
        return self._run([int(token)], 1)[0]

    def extend(self, tokens: Sequence[int], n_rows: int) -> np.ndarray:
        return self._run([int(t) for t in tokens], n_rows).copy()

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def close(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()

    def check(self, new: list[int], n_rows: int) -> None:
        """:class:`BadRequest` unless ``new`` tokens fit this sequence and ``n_rows`` of them
        (0 ≤ n_rows ≤ their number) can be returned."""
        if not 0 <= n_rows <= len(new) or not new:
            raise BadRequest(f"asked for {n_rows} logits rows of {len(new)} new tokens")
        if len(self.tokens) + len(new) > self.n_ctx:
            raise BadRequest(f"the context of {self.n_ctx} tokens is full")
        bad = [t for t in new if not 0 <= t < self.decoder.n_vocab]
        if bad:
            raise BadRequest(f"token ids must be in 0..{self.decoder.n_vocab - 1}, got {bad[:8]}")

    def _run(self, new: list[int], n_rows: int) -> np.ndarray:
        """Run ``new`` tokens; the logits rows after each of the last ``n_rows``."""
        if n_rows < 1:
            raise BadRequest(f"asked for {n_rows} logits rows of {len(new)} new tokens")
        self.check(new, n_rows)
        start = len(self.tokens)
        if len(new) <= SKINNY_MAX_ROWS:
            rows = self.decoder.steps(new, start, self.k_np, self.v_np)[-n_rows:]
        else:
            ids = torch.tensor(new)
            rows = self.decoder.forward(ids, start, self.k_cache, self.v_cache, n_rows).numpy()
        self.tokens.extend(new)
        return rows


def run_sessions(
    decoder: FastDecoder, work: Sequence[tuple[FastSession, Sequence[int], int]]
) -> list[np.ndarray]:
    """:meth:`~tandem.runtime.generation.BatchedBackend.run_batch` over sessions of
    ``decoder``: every item checked first, then one :meth:`FastDecoder.batch`; a session's
    tokens are committed only once it ran."""
    runs: list[BatchRun] = []
    for session, tokens, n_rows in work:
        if not isinstance(session, FastSession) or session.decoder is not decoder:
            raise BadRequest("run_batch takes this model's own sessions")
        new = [int(t) for t in tokens]
        session.check(new, n_rows)
        runs.append((session.k_np, session.v_np, len(session.tokens), new, n_rows))
    if len({id(s) for s, _, _ in work}) != len(work):
        raise BadRequest("run_batch takes each session at most once")
    if not runs:
        return []
    rows = decoder.batch(runs)
    for (session, _, _), run in zip(work, runs, strict=True):
        session.tokens.extend(run[3])
    return rows


BatchRun = tuple[np.ndarray, np.ndarray, int, Sequence[int], int]
"""One sequence of :meth:`FastDecoder.batch`: (k_cache, v_cache, pos, tokens, n_rows)."""
MIXED = "mixed"  # sliding_window: layers of both kinds


def sliding_window(cfg) -> int | str | None:
    """The sliding window every layer uses, None for full attention everywhere, or
    :data:`MIXED`. Qwen2 configs carry a ``sliding_window`` that only applies with
    ``use_sliding_window``; transformers 5 spells it per layer in ``layer_types``."""
    window = getattr(cfg, "sliding_window", None)
    kinds = set((getattr(cfg, "layer_types", None) or [])[: cfg.num_hidden_layers])
    if kinds:
        if kinds == {"full_attention"}:
            return None
        if kinds == {"sliding_attention"} and window:
            return int(window)
        return MIXED
    if getattr(cfg, "use_sliding_window", True) is False or not window:
        return None
    return int(window)


def _rms_np(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm of the rows of ``x`` (T, H) with weight ``w`` (H,)."""
    if len(x) == 1:
        return x * (w / np.sqrt(np.dot(x[0], x[0]) / x.shape[1] + eps))
    return x * (w / np.sqrt(np.einsum("th,th->t", x, x)[:, None] / x.shape[1] + eps))


def _rope_np(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """:func:`_rope` in numpy: ``x`` (T, heads * head_dim), tables (T, 1, 2, head_dim / 2);
    returns (T, heads, 2, head_dim / 2)."""
    halves = x.reshape(len(x), -1, 2, cos.shape[-1])
    return halves * cos + halves[:, :, ::-1] * sin


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x (T, heads, head_dim); ``sin`` pre-signed."""
    t, n, d = x.shape
    swapped = x.view(t, n, 2, d // 2).flip(2).view(t, n, d)
    return torch.addcmul(x * cos, swapped, sin)


def _activation(name: str):
    if name == "silu":
        return F.silu
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _gated(act):
    def gated(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up

    return gated
