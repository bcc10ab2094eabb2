"""Greedy decoding with a static KV cache and CUDA graphs, for quantized or bf16 Llama-style models.

The decoder is small and flat in the manner of gpt-fast (PyTorch Labs, 2023): a static KV cache of
``max_seq_len`` positions, one CUDA graph per batch size for the single-token decode step (the
graph also writes the chosen token and advances the position, so decoding is graph replays
only), and eager prefill. Linear layers are any modules (``nn.Linear``, ``WNA16Linear``,
``W8A8Linear``), taken over from a Hugging Face Llama / Mistral / Qwen2 model or built at random.

Entry points for the CLI: :func:`generate` (``lowbit generate``) and :func:`bench_decode`
(``lowbit bench-decode``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.kernels import persistent, prefetch
from lowbit.kernels.linear import concat_outputs, kernels_available

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderShape:
    """Hyper-parameters of a Llama-style decoder."""

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5


LLAMA3_8B = DecoderShape()


class Block(nn.Module):
    """One pre-norm decoder layer: GQA attention over the static cache, then a SwiGLU MLP."""

    def __init__(self, shape: DecoderShape, linears: dict[str, nn.Module], norms: tuple[Tensor, Tensor]):
        super().__init__()
        self.shape = shape
        for name, module in linears.items():  # q, k, v, o, gate, up, down
            self.add_module(name, module)
        self.attn_norm = nn.Parameter(norms[0], requires_grad=False)
        self.mlp_norm = nn.Parameter(norms[1], requires_grad=False)
        self.k_cache: Tensor | None = None
        self.v_cache: Tensor | None = None
        self.qkv: nn.Module | None = None
        self.gate_up: nn.Module | None = None
        # what the attention prefetches into the L2 (lowbit.kernels.prefetch): the o and gate/up projections' weights,
        # each as [codes, scales] or [] (4 tensors or fewer, as the decode_attention_rope op takes them)
        self.attn_next: list[Tensor | None] = []

    def projections(self) -> list[nn.Module]:
        """The projections in the order a forward pass runs them."""
        names = ["qkv"] if self.qkv is not None else ["q", "k", "v"]
        names += ["o"] + (["gate_up"] if self.gate_up is not None else ["gate", "up"]) + ["down"]
        return [getattr(self, name) for name in names]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        """``x`` ``[b, t, hidden]`` at positions ``pos`` ``[t]``; ``cos``/``sin`` are the whole rotary tables
        ``[max_seq_len, head_dim]`` (rows ``pos`` are used); ``mask`` ``[t, L]`` the causal mask of ``pos``."""
        s = self.shape
        b, t, _ = x.shape
        fused = fused_gemv_ok(x, [self.qkv, getattr(self, "o", None), self.gate_up, getattr(self, "down", None)])
        if fused:  # RMSNorm inside the qkv launch
            qkv = self.qkv.fused(x, norm=self.attn_norm, eps=s.rms_eps)
        else:
            h = F.rms_norm(x, (s.hidden_size,), self.attn_norm, s.rms_eps)
        if self.qkv is not None:
            q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
            q, k, v = (qkv if fused else self.qkv(h)).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        q = q.view(b, t, s.num_heads, s.head_dim).transpose(1, 2)
        k = k.view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        if decode_kernel_ok(q, s.num_heads // s.num_kv_heads * t, pos):
            from lowbit.kernels.attention import decode_attention_rope_op

            # rotary (reading rows pos of the tables), cache writes and attention in one launch
            attn = decode_attention_rope_op(q, k, v, cos, sin, self.k_cache, self.v_cache, pos, *self.attn_next)
        else:
            cos, sin = cos[pos], sin[pos]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
            attn = gqa_attention(q, self.k_cache, self.v_cache, mask, pos)
        attn = attn.transpose(1, 2).reshape(b, t, s.num_heads * s.head_dim)
        mlp = (getattr(self, "o", None), self.gate_up, getattr(self, "down", None))
        if persistent.mlp_block_ok(x, *mlp, self.mlp_norm):  # o, norm, gate/up, SwiGLU, down: one launch
            return persistent.mlp_block_op(attn, x, *mlp, self.mlp_norm, s.rms_eps)
        if fused:  # residual add in the o launch, RMSNorm in gate_up's, SwiGLU in gate_up's or down's, residual in down's
            x = self.o.fused(attn, residual=x)
            if cuda_glu_ok(x):  # the CUDA kernel: SwiGLU on gate_up's output rows, once per feature
                act = self.gate_up.fused(x, norm=self.mlp_norm, eps=s.rms_eps, glu=True)
                return self.down.fused(act, residual=x)
            gate_up = self.gate_up.fused(x, norm=self.mlp_norm, eps=s.rms_eps)
            return self.down.fused(gate_up, swiglu=True, residual=x)
        x = x + self.o(attn)
        h = F.rms_norm(x, (s.hidden_size,), self.mlp_norm, s.rms_eps)
        if FUSE[0] == "glu" and fused_gemv_ok(h, [self.gate_up], mode="on") and cuda_glu_ok(h):  # SwiGLU in gate_up's
            return x + self.down(self.gate_up.fused(h, glu=True))
        if self.gate_up is not None:
            gate, up = self.gate_up(h).chunk(2, dim=-1)
        else:
            gate, up = self.gate(h), self.up(h)
        return x + self.down(F.silu(gate) * up)

    def fuse_projections(self) -> None:
        """Replace q/k/v and gate/up by one concatenated projection each, where their kinds allow."""
        self.qkv = concat_outputs([self.q, self.k, self.v])
        self.gate_up = concat_outputs([self.gate, self.up])
        if self.qkv is not None:
            del self.q, self.k, self.v
        if self.gate_up is not None:
            del self.gate, self.up


# "auto": the decode-attention kernel on CUDA for a decode step (at most 16 query rows per key/value head), else
# "reduce" there and "matmul" above; see gqa_attention. bench/decode_profile.py --attention compares them
# (bench/notes/kernels.md, sessions 8 and 9).
ATTENTION = ["auto"]


# "auto" (default): a decode step of one bf16 token on a CUDA GPU of compute capability 9.0+ runs each layer's
# RMSNorms, SwiGLU and residual adds inside its 4-bit GEMV launches (the CUDA-core kernel of lowbit.kernels.cuda_gemv:
# the norm as a scale on the outputs with the activations staged once per block, SwiGLU on gate/up's output rows),
# 260 -> 164 launches per Llama-3-8B step, 1.989 -> 1.874 ms on the H200 (bench/notes/kernels.md, session 13);
# "on": every decode step of up to 8 tokens, also with the Triton GEMV (w4a16.Fusion) and in Triton's interpreter
# (tests). The Triton GEMV alone did not pay (session 9: 2.563 ms per step against 2.500, every program redoing the
# prologue over the whole input row). "glu": only SwiGLU, on gate/up's output rows; "off": never.
FUSE = ["auto"]


# Whether the final RMSNorm goes inside the lm_head's launch where FUSE fuses the layers. Off: at a 128k vocabulary the
# lm_head is thousands of blocks that would each re-read the input and the norm weight, and on the H200 the unfused
# tensor-core launch plus a separate norm was the faster (68.7 against 76.3 us for the launch alone in the decode
# step's graph, session 13, call 4; 69.6 against 81.5 us in session 14, call 3, where the whole step took 1.787 against
# 1.796 ms).
FUSE_LM_HEAD = [False]


def fused_gemv_ok(x: Tensor, linears: list[nn.Module | None], mode: str | None = None) -> bool:
    """Whether this step's projections run with the elementwise work fused in (see ``FUSE``): all of them
    4-bit :class:`~lowbit.kernels.linear.WNA16Linear` with groups of at least 128 (fused q/k/v and gate/up), no
    bias or input permutation, at most 8 tokens, no autograd recording."""
    from lowbit.kernels.linear import WNA16Linear

    mode = mode or FUSE[0]
    if mode in ("off", "glu") or (mode == "auto" and not cuda_glu_ok(x)) or not kernels_available(x.device):
        return False
    if x.shape[0] * x.shape[1] > 8 or (torch.is_grad_enabled() and x.requires_grad):
        return False
    return all(
        isinstance(m, WNA16Linear) and m.bits == 4 and (m.group_size == -1 or m.group_size >= 128)
        and m.bias is None and m.input_permutation is None
        for m in linears
    )  # fmt: skip


def cuda_glu_ok(x: Tensor) -> bool:
    """Whether the fused step puts SwiGLU on gate/up's output (the CUDA-core kernel of :mod:`lowbit.kernels.cuda_gemv`:
    one bf16 token on a compute capability 9.0+ GPU) rather than on down's input (the Triton GEMV)."""
    if not x.is_cuda or x.dtype != torch.bfloat16 or x.shape[0] * x.shape[1] != 1:
        return False
    return _cuda_kernels_on(x.device.index if x.device.index is not None else torch.cuda.current_device())


@torch.compiler.assume_constant_result
def _cuda_kernels_on(index: int) -> bool:
    """:func:`lowbit.kernels.cuda_gemv._capability_ok`, a constant to ``torch.compile`` (it probes NVRTC once)."""
    from lowbit.kernels import cuda_gemv

    return cuda_gemv._capability_ok(index)


def decode_kernel_ok(q: Tensor, rows: int, pos: Tensor | None) -> bool:
    """Whether :mod:`lowbit.kernels.attention`'s decode kernel serves this step: ``ATTENTION`` is ``"triton"``, or
    ``"auto"`` on CUDA (on the CPU the kernel runs only in Triton's interpreter, a test vehicle); at most 16 query
    rows per key/value head; the positions known; no autograd recording (the kernel has no backward)."""
    mode = ATTENTION[0]
    if mode not in ("auto", "triton") or pos is None or rows > 16:
        return False
    if torch.is_grad_enabled() and q.requires_grad:
        return False
    return (mode == "triton" or q.is_cuda) and kernels_available(q.device)


def gqa_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor, pos: Tensor | None = None) -> Tensor:
    """Grouped-query attention of ``q`` ``[b, H, t, d]`` over the static caches ``[b, KV, L, d]``.

    The ``H / KV`` query heads that share a key/value head are stacked into one matrix product
    against that head's cache, so the cache is read once and never repeated per query head (the
    masked SDPA call with ``enable_gqa`` falls back to PyTorch's math path, which copies the cache
    for every query head: about a dozen launches and 10 MB of traffic per layer at 8B / 640
    positions). ``mask`` ``[t, L]`` is True where a query position may attend. The decode kernel
    (``"auto"`` on CUDA, ``"triton"``) does not read ``mask``: it computes the causal mask from ``pos``
    (``positions <= pos[i]``, what :class:`Decoder` passes); pass ``pos=None`` for any other mask.

    ``ATTENTION[0]``:

    * ``"matmul"``: two matrix products around a float32 softmax. For a decode step (4 query rows per
      head at 8B) cuBLAS runs them as batched GEMV kernels that reduce the 640 cache positions nearly
      serially: 26 us per layer on the H200, a quarter of the W4A16 step.
    * ``"reduce"``: the same arithmetic written as broadcast products summed over ``d`` and over the
      positions, in float32. Under ``torch.compile`` Inductor turns each into one parallel reduction
      kernel and fuses the softmax in; eagerly it materializes ``[b, KV, rows, L, d]`` (fine for a few
      rows, so it is used only up to 16 rows per head).
    * ``"triton"``: :func:`lowbit.kernels.attention.decode_attention`, one kernel reading each head's cache
      once up to ``pos`` (needs ``pos``, the query positions, and no autograd recording). On the H200 it
      took the W4A16 decode step from 3.09 to 2.60 ms against ``"reduce"`` (bench/notes/kernels.md, session 9).
    * ``"auto"`` (default): ``"triton"`` for up to 16 query rows per key/value head where the Triton kernels
      run; else ``"reduce"`` for up to 16 rows, ``"matmul"`` above.
    * ``"sdpa"``: the stacked query rows go to one ``scaled_dot_product_attention`` call (no
      ``enable_gqa``: each key/value head is one attention "head" whose queries are its group's rows),
      with the mask repeated per group. On the H200 cuDNN's kernel took 32 us per layer at decode.
    """
    b, h, t, d = q.shape
    kv, length = k_cache.shape[1], k_cache.shape[2]
    group = h // kv
    qg = q.reshape(b, kv, group * t, d)  # head i reads key/value head i // group, as in transformers
    mode = ATTENTION[0]
    if decode_kernel_ok(q, group * t, pos):
        from lowbit.kernels.attention import decode_attention_op

        return decode_attention_op(q, k_cache, v_cache, pos)
    if mode in ("auto", "triton"):
        mode = "reduce" if group * t <= 16 else "matmul"
    if mode == "reduce":
        scores = (qg.unsqueeze(-2).float() * k_cache.unsqueeze(-3).float()).sum(-1) * d**-0.5
        scores = scores.view(b, kv, group, t, length).masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1).view(b, kv, group * t, length)
        out = (probs.unsqueeze(-1) * v_cache.unsqueeze(-3).float()).sum(-2)
        return out.to(q.dtype).view(b, h, t, d)
    if mode == "sdpa":
        rows = mask.repeat(group, 1)  # row g * t + i of qg is query position i
        return F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=rows).view(b, h, t, d)
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * d**-0.5
    scores = scores.view(b, kv, group, t, length).masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).to(q.dtype).view(b, kv, group * t, length)
    return torch.matmul(probs, v_cache).view(b, h, t, d)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (RoFormer, Su et al. 2021, https://arxiv.org/abs/2104.09864), half-split form."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Decoder(nn.Module):
    """Llama-style decoder with a static KV cache; ``forward`` returns the last position's logits."""

    def __init__(
        self, shape: DecoderShape, embed: Tensor, blocks: list[Block], norm: Tensor, lm_head: nn.Module
    ):
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding.from_pretrained(embed, freeze=True)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.Parameter(norm, requires_grad=False)
        self.lm_head = lm_head
        self.cos: Tensor | None = None
        self.sin: Tensor | None = None
        self.rope_tables: tuple[Tensor, Tensor] | None = None

    def setup_cache(
        self, batch_size: int, max_seq_len: int, rope: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """Allocate the static KV cache and the rotary tables (``rope`` overrides the plain RoPE tables); link the
        projections for the L2 prefetch (:meth:`link_prefetch`, inert while it is off)."""
        s, dtype, device = self.shape, self.norm.dtype, self.norm.device
        self.link_prefetch()
        for block in self.blocks:
            shape = (batch_size, s.num_kv_heads, max_seq_len, s.head_dim)
            block.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            block.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        if rope is None:
            inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim))
            angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv)
            angles = torch.cat((angles, angles), dim=-1)
            rope = (angles.cos(), angles.sin())
        self.cos, self.sin = (r[:max_seq_len].to(dtype) for r in rope)
        self.positions = torch.arange(max_seq_len, device=device)

    def link_prefetch(self) -> None:
        """Tell each 4-bit projection, and each layer's attention, whose weights come next in a forward pass, for
        the L2 prefetch of :mod:`lowbit.kernels.prefetch` (which does nothing while ``prefetch.NEXT_MB`` is 0). The
        chain wraps around: the lm_head prefetches the first layer's q/k/v for the next decode step."""
        chain = [m for block in self.blocks for m in block.projections()] + [self.lm_head]
        for i, module in enumerate(chain):
            if hasattr(module, "l2_next"):
                module.l2_next = prefetch.targets(chain[(i + 1) % len(chain)])
        for block in self.blocks:
            mlp = block.gate_up if block.gate_up is not None else block.gate
            pairs = [prefetch.targets(block.o), prefetch.targets(mlp)]
            block.attn_next = [(pair + [None, None])[i] for pair in pairs for i in range(2)] if pairs[0] else []

    def fuse_projections(self) -> Decoder:
        """Fuse q/k/v and gate/up of every block (fewer, larger GEMM launches); returns ``self``."""
        for block in self.blocks:
            block.fuse_projections()
        return self

    def forward(self, ids: Tensor, pos: Tensor) -> Tensor:
        x = self.embed(ids)
        mask = self.positions[None, :] <= pos[:, None]
        for block in self.blocks:
            x = block(x, self.cos, self.sin, pos, mask)  # the rotary tables; each block reads rows pos
        if FUSE_LM_HEAD[0] and fused_gemv_ok(x[:, -1:], [self.lm_head]):
            return self.lm_head.fused(x[:, -1], norm=self.norm, eps=self.shape.rms_eps)
        x = F.rms_norm(x[:, -1], (self.shape.hidden_size,), self.norm, self.shape.rms_eps)
        return self.lm_head(x)


@dataclass
class DecodeResult:
    """Generated token ids ``[batch, new_tokens]`` and timings."""

    tokens: Tensor
    prefill_seconds: float
    decode_seconds: float
    timed_steps: int
    compiled: bool = False  # the decode step really ran compiled (not only asked to)

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput over the timed steps: tokens of all sequences per second, prefill excluded."""
        return self.tokens.shape[0] * self.timed_steps / self.decode_seconds


def argmax_last(logits: Tensor, chunk: int = 1024) -> Tensor:
    """``logits.argmax(-1, keepdim=True)`` (the first maximal index) as two reductions: the maximum of each chunk of
    ``chunk`` entries, then the first chunk holding the largest. One reduction over a 128k vocabulary is a single
    program, 21 us of a 1.9 ms Llama-3-8B decode step on the H200 (bench/notes/kernels.md, session 13); this way
    about a hundred programs share it. Short rows, and integer logits, take the plain argmax."""
    n = logits.shape[-1]
    if n <= 4 * chunk or not logits.is_floating_point():
        return logits.argmax(-1, keepdim=True)
    padded = F.pad(logits, (0, -n % chunk), value=float("-inf")).unflatten(-1, (-1, chunk))
    best, where = padded.max(-1)  # per chunk: the largest value and its first index
    pick = best.argmax(-1, keepdim=True)  # the first chunk with the largest value
    return pick * chunk + where.gather(-1, pick)


@torch.no_grad()
def greedy_decode(
    model: Decoder, prompt: Tensor, new_tokens: int, use_cuda_graph: bool = True, compile_step: bool = False
) -> DecodeResult:
    """Prefill ``prompt`` ``[batch, T]`` eagerly, then decode greedily up to ``new_tokens`` tokens.

    The decode step runs as one CUDA graph (captured after a warm-up step that also compiles the
    kernels for this batch size) that writes its argmax into its own input and advances the
    position. Only the replayed steps are timed.

    ``compile_step``: the decode step goes through ``torch.compile`` first (Inductor fuses the
    norms, rotary embedding, cache writes, softmax and SwiGLU around the quantized GEMMs, which
    stay lowbit's kernels as opaque custom ops); compilation happens in the untimed warm-up step.
    If compilation fails the step runs eagerly and a warning says so.
    """
    batch, prompt_len = prompt.shape
    device = prompt.device
    model.setup_cache(batch, prompt_len + new_tokens + 1, model.rope_tables)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    ids = argmax_last(model(prompt, torch.arange(prompt_len, device=device)))
    sync()
    prefill = time.perf_counter() - start
    pos = torch.tensor([prompt_len], device=device)

    def next_ids(ids: Tensor, pos: Tensor) -> Tensor:
        """The step's greedy choice (:func:`argmax_last`)."""
        return argmax_last(model(ids, pos))

    forward = next_ids
    if compile_step:
        # A fresh compile per call: each (scheme, batch) of a benchmark would otherwise add a recompilation of the
        # same forward, and past dynamo's recompile limit (8) it silently runs eagerly.
        torch._dynamo.reset()
        forward = torch.compile(next_ids, dynamic=False)

    def step() -> None:
        ids.copy_(forward(ids, pos))
        pos.add_(1)

    compiled = False
    if compile_step:
        try:
            frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            forward(ids, pos)  # compile now (same inputs as the first step), outside any timing
            compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames
            if not compiled:
                logger.warning("torch.compile produced no graph for the decode step; decoding eagerly")
        except Exception as exc:  # a missing compiler toolchain, an unsupported op: run eagerly, say so
            logger.warning("torch.compile of the decode step failed (%s: %s); decoding eagerly",
                           type(exc).__name__, str(exc)[:300])  # fmt: skip
        if not compiled:
            forward = next_ids

    out = [ids.clone()]
    run = step
    if use_cuda_graph and device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up outside the capture: Triton compiles for this batch size here
        torch.cuda.current_stream().wait_stream(side)
        out.append(ids.clone())
        graph = torch.cuda.CUDAGraph()
        pos_before = pos.clone()
        with torch.cuda.graph(graph):
            step()
        pos.copy_(pos_before)  # capture does not run the step; keep the position honest
        run = graph.replay
    timed_steps = new_tokens - len(out)
    sync()
    start = time.perf_counter()
    for _ in range(timed_steps):
        run()
        out.append(ids.clone())
    sync()
    decode = time.perf_counter() - start
    return DecodeResult(torch.cat(out, dim=1), prefill, decode, timed_steps, compiled)


def random_decoder(
    shape: DecoderShape,
    make_linear,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Decoder:
    """A random-weight decoder; ``make_linear(in_features, out_features)`` builds each projection."""
    torch.manual_seed(seed)
    s = shape
    q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    sizes = {
        "q": (s.hidden_size, q_out),
        "k": (s.hidden_size, kv_out),
        "v": (s.hidden_size, kv_out),
        "o": (q_out, s.hidden_size),
        "gate": (s.hidden_size, s.intermediate_size),
        "up": (s.hidden_size, s.intermediate_size),
        "down": (s.intermediate_size, s.hidden_size),
    }
    ones = torch.ones(s.hidden_size, device=device, dtype=dtype)
    blocks = [
        Block(s, {name: make_linear(i, o) for name, (i, o) in sizes.items()}, (ones.clone(), ones.clone()))
        for _ in range(s.num_layers)
    ]
    embed = torch.randn(s.vocab_size, s.hidden_size, device=device, dtype=dtype) * 0.02
    lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False, device=device, dtype=dtype)
    nn.init.normal_(lm_head.weight, std=0.02)
    return Decoder(s, embed, blocks, ones.clone(), lm_head).eval()


def decoder_from_hf(model: nn.Module, max_seq_len: int = 4096) -> Decoder:
    """Take over the modules of a Hugging Face Llama / Mistral / Qwen2 causal LM (no copies)."""
    cfg = model.config
    if getattr(cfg, "model_type", "") not in ("llama", "mistral", "qwen2"):
        raise ValueError(
            f"lowbit's decode runtime supports llama, mistral and qwen2 models, not {cfg.model_type}; "
            "use transformers' generate for other families"
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = DecoderShape(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        rope_theta=float(getattr(cfg, "rope_theta", 10000.0)),
        rms_eps=cfg.rms_norm_eps,
    )
    blocks = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = {
            "q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
            "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj,
        }  # fmt: skip
        blocks.append(
            Block(
                shape,
                linears,
                (layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data),
            )
        )
    decoder = Decoder(
        shape, model.model.embed_tokens.weight.data, blocks, model.model.norm.weight.data, model.lm_head
    )
    # Hugging Face's rotary module knows every rope-scaling variant (llama3, yarn, ...): use its tables.
    device = model.model.embed_tokens.weight.device
    positions = torch.arange(max_seq_len, device=device)[None]
    dummy = torch.zeros(1, device=device, dtype=torch.float32)
    cos, sin = model.model.rotary_emb(dummy, positions)
    decoder.rope_tables = (cos[0], sin[0])
    return decoder.eval()


def generate(
    model_path: str,
    prompt: str,
    max_new_tokens: int = 128,
    device: str = "cuda",
    use_cuda_graph: bool = True,
    compile_step: bool = False,
) -> tuple[str, DecodeResult]:
    """Greedy generation from a lowbit (compressed-tensors) or bf16 checkpoint folder.

    ``compile_step``: compile the decode step first (see :func:`greedy_decode`). Returns the decoded
    text (prompt excluded) and the :class:`DecodeResult` with its tokens/s.
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.kernels.checkpoint import load_quantized

    config_text = (Path(model_path) / "config.json").read_text() if Path(model_path).is_dir() else ""
    if "compressed-tensors" in config_text:
        model, tokenizer = load_quantized(model_path, device=device, dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).to(device).eval()
        tokenizer = None
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    decoder = decoder_from_hf(model, max_seq_len=ids.shape[1] + max_new_tokens + 1).fuse_projections()
    result = greedy_decode(decoder, ids, max_new_tokens, use_cuda_graph, compile_step)
    tokens = result.tokens[0].tolist()
    if tokenizer.eos_token_id in tokens:  # decoding runs a fixed number of steps; the text stops at EOS
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True), result


def bench_decode(
    scheme: str = "w4a16",
    batch_sizes: tuple[int, ...] = (1, 16),
    prompt_len: int = 512,
    new_tokens: int = 128,
    shape: DecoderShape = LLAMA3_8B,
    device: str = "cuda",
    compile_step: bool = False,
    quantize_lm_head: bool = False,
) -> list[dict]:
    """Decode throughput of a random-weight model of ``shape`` (Llama-3-8B by default).

    ``scheme``: ``bf16``, ``w4a16`` (g128 symmetric), ``w8a16`` (g128), ``int8`` (W8A8) or ``fp8``
    (W8A8 e4m3). The lm_head stays bf16 unless ``quantize_lm_head`` (then it is of ``scheme`` too, and
    the rows' scheme reads e.g. ``w4a16+lm_head``). ``compile_step``: see :func:`greedy_decode` (the
    same for every scheme of a run). Returns one dict per batch size.
    """
    make_linear = linear_factory(scheme, device)
    model = random_decoder(shape, make_linear, device).fuse_projections()
    label = scheme
    if quantize_lm_head and scheme != "bf16":
        model.lm_head = make_linear(shape.hidden_size, shape.vocab_size)
        label = f"{scheme}+lm_head"
    rows = []
    for batch in batch_sizes:
        prompt = torch.randint(0, shape.vocab_size, (batch, prompt_len), device=device)
        result = greedy_decode(model, prompt, new_tokens, compile_step=compile_step)
        rows.append(
            {
                "scheme": label,
                "batch": batch,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "prefill_s": result.prefill_seconds,
                "decode_s": result.decode_seconds,
                "tokens_per_s": result.tokens_per_second,
                "compiled": result.compiled,
            }
        )
        logger.info("%s batch %d: %.1f tokens/s", label, batch, result.tokens_per_second)
    return rows


def decode_table(rows: list[dict]) -> str:
    """Markdown table of :func:`bench_decode` rows, with each scheme's tokens/s relative to bf16."""
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["scheme"] == "bf16"}
    lines = ["| scheme | batch | decode tokens/s | vs bf16 |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
        lines.append(f"| {r['scheme']} | {r['batch']} | {r['tokens_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def linear_factory(scheme: str, device: str | torch.device):
    """``make_linear(in, out)`` building random projections of ``scheme`` directly in packed form.

    Schemes: ``bf16``, ``w4a16`` / ``w8a16`` (group 128, symmetric), ``int8`` and ``fp8`` (W8A8,
    dynamic per-token activations).
    """
    from lowbit.kernels.layout import pack_wna16
    from lowbit.kernels.linear import Fp8Dynamic, Int8Dynamic, W8A8Linear, WeightOnly, WNA16Linear

    schemes = {
        "bf16": None,
        "w4a16": WeightOnly(4, 128),
        "w8a16": WeightOnly(8, 128),
        "int8": Int8Dynamic(),
        "fp8": Fp8Dynamic(),
    }
    if scheme not in schemes:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {sorted(schemes)}")
    spec = schemes[scheme]

    def make(k: int, n: int) -> nn.Module:
        if isinstance(spec, WeightOnly):
            q = torch.randint(0, 2**spec.bits, (n, k), device=device, dtype=torch.int16)
            scale = (torch.rand(n, k // spec.group_size, device=device) * 0.004 + 0.001).to(torch.bfloat16)
            return WNA16Linear(pack_wna16(q, scale, None, spec.bits, spec.group_size))
        if isinstance(spec, Int8Dynamic | Fp8Dynamic):
            w = torch.randn(n, k, device=device) * 64
            w = (
                w.clamp(-127, 127).round().to(torch.int8)
                if isinstance(spec, Int8Dynamic)
                else w.to(torch.float8_e4m3fn)
            )
            return W8A8Linear(w, torch.full((n,), 3e-4, device=device))
        lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        nn.init.normal_(lin.weight, std=0.02)
        return lin

    return make
