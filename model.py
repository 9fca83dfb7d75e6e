"""
A GPT-2 language model in one file, with the position encoding as one flag (GPTConfig.pos_emb).
The encodings live in rope.py; this file only calls their hooks. References:
1) OpenAI's GPT-2 TensorFlow implementation:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT, whose structure and names this follows: https://github.com/karpathy/nanoGPT
"""
import math
import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from rope import ENCODINGS, ROPE_SCALINGS, build_position_encoding


@dataclass
class GPTConfig:
    block_size: int = 1024  # training context length (the number of positions `learned` has)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # bias in Linears and LayerNorms, like GPT-2; False: a bit better and faster
    pos_emb: str = 'rope'  # one of rope.ENCODINGS
    # 'gpt2': N(0, 0.02) weights (residual projections / sqrt(2 n_layer)), wte tied to lm_head.
    # 'pytorch': the modules' own defaults (Linear U(+-1/sqrt(fan_in)), wte N(0, 1)), lm_head
    # untied, zero biases: at tiny widths (d=64) content lookups such as MQAR's key -> value form
    # far sooner from it (config/synthetic_mqar.py)
    weight_init: str = 'gpt2'
    rope_base: float = 10000.0  # frequency base of every encoding that derives frequencies from it
    # ComRoPE block size b (the paper's practical choice); must divide n_embd // n_head
    comrope_block: int = 8
    # 'rope': angle matrices start as RoPE's generators (equals rope at step 0); 'random'
    comrope_init: str = 'rope'
    # std of P for comrope_init='random' (small: positions are raw token indices)
    comrope_init_std: float = 0.02
    # FoX forget gate (arXiv:2503.02130) in every attention layer, with any pos_emb
    forget_gate: bool = False
    # carope's x_t: 'block' (each attention's LayerNorm'd input) or 'embedding'
    carope_source: str = 'block'
    # selective (rope.SelectiveRoPE): defaults are the released code's language-modelling sweep
    # (github.com/timurcarstensen/selective-rope, configs/language_modeling/language_modeling.yaml)
    # 0 = per-head weight-normalised d/H -> P projection (LM sweep); r > 0: d -> r -> H*P
    selective_rank: int = 0
    selective_conv: bool = True  # causal depthwise conv over time on u (release's skip_conv=False)
    selective_conv_width: int = 4  # the release's d_conv
    # SiLU after the conv (LM sweep conv_act: silu; the class default is none)
    selective_conv_silu: bool = True
    selective_bias: bool = False  # u += exp(beta), beta init 0 (LM sweep use_bias: false)
    # phase gate u *= sigmoid(Linear_{d->H}(h)) (LM sweep use_gate: true, standard)
    selective_gate: bool = True
    # test hook: u_t = 1, no projection (conv/gate/bias off too: RoPE at 1..T)
    selective_reduce: bool = False
    # cope: the number of learned position embeddings e[0..npos_max-1] (positions clamp)
    cope_npos_max: int = 64
    # RoPE's frequency table (rope, crope: the encodings built on rope.RoPE; others raise an error)
    rope_fraction: float = 1.0  # p-RoPE: only the round(p hd/2) highest-frequency pairs rotate
    rope_scaling: str = 'none'  # context extension: 'none', 'linear', 'ntk', 'dynamic' or 'yarn'
    rope_scaling_factor: float = 1.0  # its factor s (1 = unchanged) over block_size, the training L
    rope_scaling_length: int = 0  # L of rope_scaling: RoPE's training length (0 = block_size)


# the valid values of GPTConfig's fields, as every script's config keys check them
# (configurator.py's _choices and _ranges: intervals, [ ] closed, ( ) open); the encodings' own
# constructors check what depends on several fields
CONFIG_CHOICES = {'pos_emb': list(ENCODINGS), 'weight_init': ['gpt2', 'pytorch'],
                  'comrope_init': ['rope', 'random'], 'carope_source': ['block', 'embedding'],
                  'rope_scaling': list(ROPE_SCALINGS)}
CONFIG_RANGES = {'block_size': '[1, inf)', 'vocab_size': '[1, inf)', 'n_layer': '[1, inf)',
                 'n_head': '[1, inf)', 'n_embd': '[1, inf)', 'dropout': '[0, 1)',
                 'rope_base': '(1, inf)', 'comrope_block': '[2, inf)',
                 'comrope_init_std': '(0, inf)', 'selective_rank': '[0, inf)',
                 'selective_conv_width': '[1, inf)', 'cope_npos_max': '[1, inf)',
                 'rope_scaling_length': '[0, inf)', 'rope_fraction': '[0, 1]',
                 'rope_scaling_factor': '[1, inf)'}


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


# device types whose biased attention runs fused in FlexAttention (tests add 'cpu')
FLEX_DEVICES = ('cuda',)
# eager flex_attention is an unfused reference that materialises the scores: compiled, it is the
# fused kernel. A compiled model inlines it; an eager one calls torch.compile(flex_attention), made
# on first use (tests set it): creating it at import would import dynamo and inductor, ~3 s at
# every start of every script
_flex_attention = None


def fused_flex_attention(q, k, v, **kw):
    global _flex_attention
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kw)
    if _flex_attention is None:
        _flex_attention = torch.compile(flex_attention)
    return _flex_attention(q, k, v, **kw)


def biased_attention(q, k, v, bias, dropout_p):
    """Causal attention with an additive score term, the one path of every attention bias
    (rope.py's score_bias hook and the FoX forget gate):
    softmax_j(q_i.k_j / sqrt(hs) + bias(b, h, i, j)) v_j over keys j <= Tk - T + i.
    q: (B, nh, T, hs), the last T of the Tk positions of k, v: (B, nh, Tk, hs).
    bias(b, h, i, j): batch, head, query index (0..T-1) and key index (0..Tk-1), int64 tensors,
    -> the fp32 score term; written once, it serves both paths. Training and evaluation (T == Tk,
    no dropout) on a FLEX_DEVICES device run FlexAttention with it as a score_mod, called per score
    and never materialised; elsewhere (CPU, MPS, dropout, KV-cached decoding, where only the few
    new queries are scored) it is evaluated on broadcast index grids into a float mask for SDPA.
    Both add it in fp32: rounded to bf16 (ulp 0.125 at 20), a bias of -20.3 against a score of 20
    weights that key 0.4375 instead of 0.4256."""
    B, nh, T, Tk = q.size(0), q.size(1), q.size(2), k.size(2)
    if q.device.type in FLEX_DEVICES and T == Tk and dropout_p == 0.0:
        block_mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, T, T, device=q.device)
        # flex traces score_mod with a score of q's dtype (its kernels hold scores in fp32):
        # s + the fp32 bias stays fp32, where a cast of the bias to s.dtype rounded it to bf16
        return fused_flex_attention(q, k, v, block_mask=block_mask,
                                    score_mod=lambda s, b, h, i, j: s + bias(b, h, i, j))
    # b (B,1,1,1), h (1,nh,1,1), i (1,1,T,1), j (1,1,1,Tk)
    grid = [torch.arange(n, device=q.device).view([-1 if d == a else 1 for d in range(4)])
            for a, n in enumerate((B, nh, T, Tk))]
    # query i is key Tk - T + i
    causal = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
    mask = bias(*grid).masked_fill(~causal, float('-inf'))  # (B|1, nh|1, T, Tk) fp32
    # SDPA takes a float mask only in q's dtype, and autocast casts q, k, v and the mask to bf16: so
    # this path runs in fp32 (fp64 in a float64 model) outside autocast, and casts the output back
    dtype = torch.promote_types(q.dtype, mask.dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
        y = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask.to(dtype),
                                           dropout_p=dropout_p)
    return y.to(q.dtype)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, pe):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} must be a multiple of n_head={config.n_head}")
        self.c_attn = pe.qkv_projection(config)  # d -> 3d (q, k, v)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # FoX forget gate f_t = sigmoid(w_h . x_t + b_h), one per head. GPT's init gives
        # w ~ N(0, 0.02^2), b = 0, as FoX's official code does for its default data-dependent gate
        # (ForgettingAttentionLayer.fgate_proj: Linear(d, H, bias=True), normal(0.02) weight, zero
        # bias, so f = 1/2 at init)
        self.fgate = (nn.Linear(config.n_embd, config.n_head, bias=True) if config.forget_gate
                      else None)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, layer, pe, pos, shared, cache):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q, k = pe.rotate(layer, q, k, x, shared, cache)
        cq = self.log_forget_cumsum(x) if self.fgate is not None else None  # (B, nh, T) fp32
        # two tensors: FlexAttention's backward takes one index into each captured tensor that needs
        # a gradient
        ck = cq.clone() if cq is not None else None
        mask, causal = None, True
        if cache is not None:  # KV-cached decoding: keys/values of earlier tokens, already rotated
            if 'k' in cache:
                k = torch.cat((cache['k'], k), dim=2)
                v = torch.cat((cache['v'], v), dim=2)
                if cq is not None:  # the running sum goes on from the last cached token
                    cq = cache['fgate_c'][..., -1:] + cq
                    ck = torch.cat((cache['fgate_c'], cq), dim=2)  # (B, nh, Tk)
            cache['k'], cache['v'] = k, v
            if cq is not None:
                cache['fgate_c'] = ck
            Tk = k.size(2)
            if Tk > T:  # new queries sit at the end: query i sees keys up to Tk - T + i
                causal = False
                mask = (None if T == 1 else
                        torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T))
        dropout_p = self.dropout if self.training else 0.0
        # score terms (rope.py's score_bias; FoX: sum_{j<l<=i} log f_l = c_i - c_j), fp32, composed
        # by addition
        biases = [pe.score_bias(layer, q, k, x, pos, shared, cache)]
        if cq is not None:
            biases.append(lambda b, h, i, j: cq[b, h, i] - ck[b, h, j])
        biases = [f for f in biases if f is not None]
        if biases:
            y = biased_attention(q, k, v, lambda b, h, i, j: sum(f(b, h, i, j) for f in biases),
                                 dropout_p)
        else:
            # PoPE's q, k are twice v's width: the fused kernels (flash) take one width, and without
            # it SDPA falls back to its unfused math path (1.4x the step on CPU); zeros added to v
            # add zeros to y
            hv = v.size(-1)
            v = F.pad(v, (0, q.size(-1) - hv)) if q.size(-1) != hv else v
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=dropout_p)[..., :hv]
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # reassemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))

    def log_forget_cumsum(self, x):
        """c_t = sum_{l<=t} log f_l (so c_i - c_j = sum_{j<l<=i} log f_l),
        x: (B, T, C) -> (B, nh, T). The gate's logits, log sigmoid and the cumsum run in fp32
        (fp64 in a float64 model), outside autocast: c is a long running sum whose differences are
        the attention bias."""
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = F.linear(x.to(dt), self.fgate.weight.to(dt), self.fgate.bias.to(dt))  # (B, T, nh)
            return F.logsigmoid(z).transpose(1, 2).cumsum(dim=-1)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, pe):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, pe)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, layer, pe, pos, shared, cache):
        x = x + self.attn(self.ln_1(x), layer, pe, pos, shared, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        # the encoding is built first (its own init), passed to every layer, never registered twice
        self.pe = build_position_encoding(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, self.pe) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # the encoding keeps the init its paper asks for: it is not in self.transformer
        if config.weight_init == 'gpt2':
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
            self.transformer.apply(self._init_weights)
            for pn, p in self.transformer.named_parameters():
                if pn.endswith('c_proj.weight'):  # scaled init of residual projections, per GPT-2
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        elif config.weight_init == 'pytorch':
            # the modules already hold their defaults; biases start at zero
            for module in self.transformer.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
        else:
            raise ValueError(f"weight_init={config.weight_init!r}: use 'gpt2' or 'pytorch'")

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out a `learned` table
        (a tied wte counts: it is lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and hasattr(self.pe, 'wpe'):
            n -= self.pe.wpe.weight.numel()
        return n

    def param_summary(self):
        """One line: total parameters, the encoding's own, the attention's q/k/v projections."""
        total = self.get_num_params(non_embedding=False)
        pe = sum(p.numel() for p in self.pe.parameters())
        qkv = sum(p.numel() for b in self.transformer.h for p in b.attn.c_attn.parameters())
        return (f"parameters: {total / 1e6:.2f}M total | "
                f"position encoding ({self.config.pos_emb}): {pe:,}"
                f" | attention q/k/v projections: {qkv:,}")

    def forward(self, idx, targets=None, pos_offset=0, cache=None):
        """idx: (B, T) token ids. targets: (B, T) or None (-1 = ignored).
        pos_offset shifts every position.
        cache: a list with one dict per layer for KV-cached decoding (see generate), or None.
        Returns (logits, loss): logits (B, T, vocab) when targets are given, else (B, 1, vocab) of
        the last position only; loss is the mean cross entropy or None."""
        B, T = idx.size()
        start = pos_offset + (cache[0]['k'].size(2) if cache and 'k' in cache[0] else 0)
        self.check_length(start + T)
        # (T,) int64, never bf16
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.pe.embed(self.transformer.wte(idx), pos))  # (B, T, C)
        shared = self.pe.prepare(x, pos)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, layer, self.pe, pos, shared, cache[layer] if cache is not None else None)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            # the mean over scored targets (not -1); 0, not 0/0 = nan, for a batch that scores none
            loss = (F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                    ignore_index=-1, reduction='sum')
                    / (targets != -1).sum().clamp_min(1))
        else:  # inference: the last position's logits are all that sampling needs
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def check_length(self, end):
        """Raise a clear error if position end-1 is beyond what the encoding can represent."""
        if self.pe.max_len is not None and end > self.pe.max_len:
            raise ValueError(f"pos_emb={self.config.pos_emb!r} has only {self.pe.max_len} "
                             f"positions {self.pe.max_len_why} but position {end - 1} was asked "
                             f"for: keep prompt + new tokens (+ pos_offset) <= {self.pe.max_len}, "
                             f"or train an encoding without this limit "
                             f"(rope, none, sinusoidal, ...)")

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on every >=2-D tensor (matmuls, embeddings), none on biases and
        norms, nor on a tensor an encoding marks `p.no_weight_decay = True` (angles and frequencies
        are not weights to shrink)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2 and not getattr(p, 'no_weight_decay', False)]
        no_decay = [p for p in params if p.dim() < 2 or getattr(p, 'no_weight_decay', False)]
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': no_decay, 'weight_decay': 0.0}]
        fused = device_type == 'cuda'
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, seq_len):
        """Forward + backward FLOPs per token (PaLM appendix B): 6N for the matmuls + 12*L*H*Q*T
        for attention. N counts the matmuls actually run: CRoPE's q/k/v weights are half the
        parameters but a full matmul, and CoPE's gates (q.k again) and q.e[n] add
        6*L*H*Q*(T + cope_npos_max), PoPE's q'.k' (2Q wide) 6*L*H*Q*T."""
        cfg = self.config
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        qkv_params = sum(p.numel() for b in self.transformer.h for p in b.attn.c_attn.parameters())
        qkv_matmul = L * (3 * cfg.n_embd * cfg.n_embd + (3 * cfg.n_embd if cfg.bias else 0))
        lookup = (0 if self.transformer.wte.weight is self.lm_head.weight
                  else self.transformer.wte.weight.numel())
        # cope: N holds e once per layer
        extra = {'cope': 6 * L * Q * (H * seq_len + (H - 1) * cfg.cope_npos_max),
                 'pope': 6 * L * H * Q * seq_len}.get(cfg.pos_emb, 0)
        return (6 * (self.get_num_params() - lookup - qkv_params + qkv_matmul)
                + 12 * L * H * Q * seq_len + extra)

    def estimate_mfu(self, tokens_per_iter, dt, seq_len, peak_flops):
        """Model FLOPs utilisation of one iteration that processed tokens_per_iter tokens at
        sequence length seq_len in dt seconds, against peak_flops (see device_peak_flops); None
        where the peak is unknown."""
        if not peak_flops:
            return None
        return self.flops_per_token(seq_len) * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True,
                 pos_offset=0, vocab_limit=None, extrapolate=False):
        """Continue idx (B, T) by max_new_tokens tokens sampled from softmax(logits / temperature),
        kept to the top_k most likely (None = all); temperature=0 is greedy
        (the argmax, as top_k=1).
        vocab_limit: the tokenizer's vocabulary size; ids >= it (vocab_size's padding) never appear.
        The model never sees more than the block_size tokens it was trained on: as in nanoGPT, the
        prompt is cropped to its last block_size tokens, and then
        - use_cache=False recomputes the last block_size tokens (at positions 0..) every step;
        - use_cache=True keeps each layer's keys/values (and the encoding's state) and feeds one
          token a step. Once block_size keys are cached, a pe.relative encoding drops every layer's
          oldest key, value and forget-gate sum, and goes on at the true positions: each query sees
          the last block_size keys, which equals a forward with a banded causal mask of width
          block_size (a cached key keeps the older context it was computed with, so past block_size
          this is not use_cache=False). An absolute encoding (learned, sinusoidal) recomputes the
          window as use_cache=False does once it is full.
        extrapolate=True never crops: past block_size that is length extrapolation, which `learned`
        refuses with an error before generating. pos_offset shifts every position."""
        V, W = self.config.vocab_size, self.config.block_size
        vocab_limit = V if vocab_limit is None else vocab_limit
        if not 1 <= vocab_limit <= V:
            raise ValueError(f"vocab_limit={vocab_limit} is not valid; "
                             f"valid: [1, {V}] (vocab_size)")
        if not 0 <= temperature < math.inf:  # also rejects nan
            raise ValueError(f"temperature={temperature} is not valid; valid: [0, inf), 0 = greedy")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} is not valid; valid: [1, inf), or None for all tokens")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} is not valid; valid: [0, inf)")
        fed = idx.size(1) + max_new_tokens - 1  # longest context: the last new token is not fed
        self.check_length(pos_offset + (fed if extrapolate else min(fed, W)))
        cache = [{} for _ in self.transformer.h] if use_cache else None
        feed = idx if extrapolate else idx[:, -W:]
        dropped = 0  # keys dropped from the front of a sliding cache: positions go on after them
        for _ in range(max_new_tokens):
            logits, _ = self(feed, pos_offset=pos_offset + dropped, cache=cache)
            logits = logits[:, -1, :]
            logits[:, vocab_limit:] = -float('Inf')  # padding ids: no token to decode
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                # from the max down, in fp64: no temperature (1e-300, 1e300) overflows or makes
                # 0/0 or -inf/inf
                logits = (logits - logits.max(dim=-1, keepdim=True).values).double() / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, vocab_limit))
                    logits[logits < v[:, [-1]]] = -float('Inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            if cache is not None and not extrapolate and cache[0]['k'].size(2) == W:  # full window
                if self.pe.relative:  # drop the oldest key of every layer (time is dim 2)
                    for c in cache:
                        c.update({n: c[n][:, :, 1:] for n in ('k', 'v', 'fgate_c') if n in c})
                    dropped += 1
                else:  # absolute positions: recompute the window at 0..block_size-1 from now on
                    cache = None
            feed = idx_next if cache is not None else idx if extrapolate else idx[:, -W:]
        return idx


# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by substring of the
# device name.
GPU_PEAK_FLOPS = [
    ('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('H800', 989e12), ('GH200', 989e12),
    ('B200', 2250e12), ('A100', 312e12), ('A800', 312e12), ('L40S', 362e12), ('L40', 181e12),
    ('L4', 121e12), ('A10G', 125e12), ('A10', 125e12), ('A6000', 155e12), ('4090', 165e12),
    ('3090', 71e12), ('V100', 125e12), ('T4', 65e12),
]


def device_peak_flops(device, dtype):
    """Peak FLOP/s of the CUDA device for this dtype (fp32 runs on TF32 tensor cores: half the
    bf16 peak), or None for an unknown GPU, MPS or CPU: MFU is then not reported rather than made
    up."""
    if not str(device).startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS:
        if key in name:
            return flops if dtype in ('bfloat16', 'float16') else flops / 2
    return None


RUN_FILES = ('ckpt.pt', 'best.pt', 'log.jsonl')  # what train.py writes into its out_dir


def held_run(out_dir):
    """The names of a training run's files that out_dir holds (empty: no run there)."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]


def find_checkpoint(out_dir, which='best'):
    """(path, description) of a run's checkpoint: which='best' is best.pt, the weights of the best
    val loss (ckpt.pt where the run never wrote one), 'latest' is ckpt.pt, the state training
    stopped at. The description says which file it is, for the user. Raises ValueError naming the
    fix when out_dir holds neither."""
    best, latest = os.path.join(out_dir, 'best.pt'), os.path.join(out_dir, 'ckpt.pt')
    if which == 'best' and os.path.isfile(best):
        return best, f"{best} (the best val loss; --checkpoint=latest for the last state)"
    if os.path.isfile(latest):
        why = "the last state; no best.pt in this run" if which == 'best' else "the last state"
        return latest, f"{latest} ({why})"
    raise ValueError(f"no checkpoint in {out_dir} (best.pt or ckpt.pt); train one first "
                     f"(python train.py config/quickstart.py) or fix the directory given")


def unwritable(path, is_dir):
    """None if the file or directory `path` can be written, else why not, in words: checked before
    any work, so a bad --out_dir or --report fails at once and not after training. Probes the
    nearest existing folder with a temporary file (os.access says yes to root even on read-only
    file systems); nothing is left behind."""
    if not path:
        return "it is empty"
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != is_dir:
        return f"it is {'a file' if is_dir else 'a directory'}"
    folder = path if is_dir else os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file"
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return f"{folder} cannot be written ({e.strerror})"
    return None


def rebuild_encoding(model, **keys):
    """Give `model` the position encoding its config builds with these GPTConfig keys changed
    (rope_scaling, rope_scaling_factor: keys of the encoding alone, never of a weight's shape),
    keeping the encoding's weights, device and mode; model.config says what it now runs. A value
    the encoding cannot take raises its ValueError and leaves the model as it was."""
    config = replace(model.config, **keys)
    pe = build_position_encoding(config)
    pe.load_state_dict(model.pe.state_dict())
    model.pe, model.config = pe.to(model.lm_head.weight.device).train(model.training), config
    return model


def load_checkpoint(path, build=True, overrides=None):
    """(checkpoint dict, its uncompiled GPT with the weights loaded, or None unless build) from a
    ckpt.pt or best.pt train.py wrote (a plain dict, read with weights_only=True). A corrupt or
    foreign file raises ValueError naming it. overrides: GPTConfig keys of the encoding
    (rope_scaling, ...) that the model takes in place of the checkpoint's (rebuild_encoding); a
    value its encoding cannot take raises the encoding's ValueError."""
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        model = GPT(GPTConfig(**checkpoint['model_args'])) if build else None
        if build:
            model.load_state_dict(checkpoint['model'])
        checkpoint['config']['dataset'], checkpoint['meta']  # every train.py checkpoint has them
    except Exception as e:
        # else the error's first line only: not torch's advice to unpickle anything
        why = 'not a torch checkpoint' if 'eights only load failed' in str(e) else \
            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        other = (' (--checkpoint=latest reads ckpt.pt)' if os.path.basename(path) == 'best.pt'
                 else '')
        raise ValueError(f"cannot load checkpoint {path} ({why}); it is corrupt or not a nanoRoPE "
                         f"checkpoint{other}") from e
    if build and overrides:
        rebuild_encoding(model, **overrides)
    return checkpoint, model


def setup_device(device, dtype):
    """Resolve device='auto' (cuda if available, then mps, then cpu) and dtype='auto' (bfloat16
    autocast on CUDA where supported, else float16, which needs a GradScaler to train; float32 on
    CPU and MPS), turn on TF32 matmuls, and return (device, device_type, dtype, autocast context).
    train, sample, eval and bench share it. A device or dtype this torch build or machine cannot
    use raises ValueError with a one-line fix."""
    if device == 'auto':
        device = ('cuda' if torch.cuda.is_available() else
                  'mps' if torch.backends.mps.is_available() else 'cpu')
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device; "
                         f"use --device=auto, cpu, cuda, cuda:1 or mps") from None
    index = torch.device(device).index or 0
    if device_type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"device={device!r}: nanoRoPE runs on --device=cpu, cuda or mps")
    if device_type == 'cuda' and index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} cannot be used: this torch {torch.__version__} sees "
                         f"{torch.cuda.device_count()} CUDA devices"
                         + ('' if torch.backends.cuda.is_built() else " (a CPU-only build)")
                         + "; use --device=cpu")
    if device_type == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f"device='mps' is not available in this torch {torch.__version__} "
                         f"on this machine; use --device=cpu")
    if dtype == 'auto':
        dtype = (('bfloat16' if torch.cuda.is_bf16_supported() else 'float16')
                 if device_type == 'cuda' else 'float32')
    elif dtype == 'bfloat16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype='bfloat16' is not supported by "
                         f"{torch.cuda.get_device_name(device)}; use --dtype=float16 (or auto)")
    torch.set_float32_matmul_precision('high')  # TF32 on Ampere and newer
    torch.backends.cudnn.allow_tf32 = True
    ctx = (nullcontext() if dtype == 'float32' else
           torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)))
    return device, device_type, dtype, ctx
