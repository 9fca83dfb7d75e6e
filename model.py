"""
A GPT-2 language model in one file, with the position encoding as one flag (GPTConfig.pos_emb).
The encodings live in rope.py; this file only calls their hooks. References:
1) OpenAI's GPT-2 TensorFlow implementation:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT, whose structure and names this follows: https://github.com/karpathy/nanoGPT
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from rope import (ENCODINGS, INPUT_ONLY, ROPE_FAMILY, ROPE_SCALINGS, PositionEncoding,
                  build_position_encoding)


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
    # 'gpt2': N(0, 0.02) (residual projections / sqrt(2 n_layer)), wte tied to lm_head; 'pytorch':
    # the modules' defaults, lm_head untied (MQAR's lookups form far sooner at d=64 with it)
    weight_init: str = 'gpt2'
    rope_base: float = 10000.0  # frequency base of every encoding that derives frequencies from it
    comrope_block: int = 8  # ComRoPE's block size b (the paper's); divides n_embd // n_head
    comrope_init: str = 'rope'  # 'rope': the generators start as RoPE's (rope at step 0); 'random'
    comrope_init_std: float = 0.02  # std of P for 'random' (small: positions are token indices)
    forget_gate: bool = False  # FoX forget gate (arXiv:2503.02130) in every layer, any pos_emb
    # RoPE/NoPE interleaving (arXiv:2501.18795, Llama 4): layers k-1, 2k-1, ... have none; 0 = off
    nope_every: int = 0
    carope_source: str = 'block'  # CARoPE's x_t: each attention's input, or the 'embedding'
    # Selective RoPE: the released code's language-modelling sweep (its configs/language_modeling)
    selective_rank: int = 0  # 0: per-head weight-normalised d/H -> P; r > 0: d -> r -> H P
    selective_conv: bool = True  # causal depthwise conv over time on u (release: skip_conv=False)
    selective_conv_width: int = 4  # the release's d_conv
    selective_conv_silu: bool = True  # SiLU after the conv (sweep's conv_act)
    selective_bias: bool = False  # u += exp(beta), beta init 0 (sweep's use_bias)
    selective_gate: bool = True  # u *= sigmoid(Linear_{d->H}(x)) per head (sweep's use_gate)
    cope_npos_max: int = 0  # CoPE's embeddings e[0..npos_max-1]; 0: block_size + 1 (authors' code)
    fire_shared: bool = False  # FIRE: one MLP, c and L for all layers (else one set per layer)
    # RoPE's frequency table, for the encodings built on rope.RoPE (rope.ROPE_FAMILY)
    rope_fraction: float = 1.0  # p-RoPE: only the round(p hd/2) highest-frequency pairs rotate
    rope_scaling: str = 'none'  # context extension: 'none', 'linear', 'ntk', 'dynamic' or 'yarn'
    rope_scaling_factor: float = 1.0  # its factor s over L
    rope_scaling_length: int = 0  # L: the length RoPE was trained at (0 = block_size)

    def __post_init__(self):
        """The model's ranges and the rules between its keys, checked once, here, for every script
        (configurator.py checks types and CONFIG_CHOICES): a ValueError naming the fix."""
        hd, comrope = self.n_embd // max(self.n_head, 1), self.pos_emb.startswith('comrope')
        rope_keys = [f"{k}={getattr(self, k)!r}" for k, v in (
            ('rope_fraction', 1), ('rope_scaling', 'none'), ('rope_scaling_factor', 1),
            ('rope_scaling_length', 0)) if getattr(self, k) != v]
        for key, low in dict(block_size=1, vocab_size=1, n_layer=1, n_head=1, n_embd=1,
                             cope_npos_max=0, selective_conv_width=1, selective_rank=0,
                             rope_scaling_length=0, nope_every=0).items():
            if getattr(self, key) < low:
                raise ValueError(f"{key}={getattr(self, key)} must be >= {low}")
        for bad, message in [
            (not 0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)"),
            (not self.rope_base > 1, f"rope_base={self.rope_base} must be > 1"),
            (not self.comrope_init_std > 0,
             f"comrope_init_std={self.comrope_init_std} must be > 0"),
            (self.n_embd % self.n_head, f"n_embd={self.n_embd} must be a multiple of "
             f"n_head={self.n_head} (the head dim is n_embd / n_head)"),
            (hd % 2 and self.pos_emb in (*ROPE_FAMILY, 'carope', 'selective', 'fope'),
             f"pos_emb={self.pos_emb!r} rotates pairs: it needs an even n_embd/n_head, got {hd}"),
            (self.n_embd % 2 and self.pos_emb == 'sinusoidal',
             f"pos_emb='sinusoidal' needs an even n_embd (sin/cos pairs), got {self.n_embd}"),
            (comrope and (self.comrope_block < 2 or hd % self.comrope_block), f"comrope_block="
             f"{self.comrope_block} must be >= 2 and divide the head dim n_embd/n_head={hd}"),
            (comrope and self.comrope_init == 'rope' and self.comrope_block % 2,
             f"comrope_init='rope' needs an even comrope_block (RoPE's pairs must not straddle "
             f"blocks), got {self.comrope_block}"),
            (rope_keys and self.pos_emb not in ROPE_FAMILY, f"{', '.join(rope_keys)}: only the "
             f"encodings built on RoPE's frequency table take it ({', '.join(ROPE_FAMILY)}), not "
             f"pos_emb={self.pos_emb!r}; leave it at its default"),
            (self.cope_npos_max == 1, "cope_npos_max=1 counts every key as position 0 (CoPE "
             "becomes NoPE): use >= 2, or 0 for block_size + 1"),
            (self.nope_every == 1, "nope_every=1 leaves every layer without an encoding: use "
             "pos_emb='none' (or nope_every >= 2)"),
            (self.nope_every > self.n_layer, f"nope_every={self.nope_every} > n_layer="
             f"{self.n_layer} leaves every layer its encoding: use 2..{self.n_layer}, or 0"),
            (self.nope_every and self.pos_emb in INPUT_ONLY,
             f"nope_every={self.nope_every}: pos_emb={self.pos_emb!r} has nothing per layer to "
             f"leave out; interleave an encoding of the attention (rope, alibi, ...)"),
            (not 0 <= self.rope_fraction <= 1,
             f"rope_fraction={self.rope_fraction} must be in [0, 1]"),
            (not self.rope_scaling_factor >= 1,
             f"rope_scaling_factor={self.rope_scaling_factor} must be >= 1"),
            (self.rope_scaling == 'none' and self.rope_scaling_factor != 1,
             f"rope_scaling_factor={self.rope_scaling_factor} has no effect with rope_scaling="
             f"'none'; choose a rope_scaling, or leave it at 1"),
        ]:
            if bad:
                raise ValueError(message)


CONFIG_CHOICES = {'pos_emb': list(ENCODINGS), 'weight_init': ['gpt2', 'pytorch'],  # configurator
                  'comrope_init': ['rope', 'random'], 'carope_source': ['block', 'embedding'],
                  'rope_scaling': list(ROPE_SCALINGS)}


NOPE = PositionEncoding()  # nope_every's layers: identity hooks, no weights

FLEX_DEVICES = ('cuda',)  # where biased attention runs fused in FlexAttention (tests add 'cpu')
# eager flex_attention is an unfused reference: compiled, it is the fused kernel. Made on first use
# (importing dynamo and inductor costs ~3 s at every start of every script)
_flex_attention = None


def fused_flex_attention(q, k, v, **kw):
    global _flex_attention
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kw)
    if _flex_attention is None:
        _flex_attention = torch.compile(flex_attention)
    return _flex_attention(q, k, v, **kw)


def biased_attention(q, k, v, bias, dropout_p):
    """Causal attention with an additive score term, the one path of every attention bias (rope.py's
    score_bias and the FoX gate): softmax_j(q_i.k_j / sqrt(hs) + bias(b, h, i, j)) v_j, j <= Tk-T+i.
    q: (B, nh, T, hs), the last T of the Tk positions of k, v: (B, nh, Tk, hs); bias: a function
    of int64 batch, head, query and key indices -> the fp32 term. Training and evaluation on a
    FLEX_DEVICES device run it as FlexAttention's score_mod, never materialised; elsewhere (CPU,
    dropout, KV-cached decoding) it fills a float mask for SDPA. Both add it in fp32 (a bias of
    -20.3 rounded to bf16 against a score of 20 weights that key 0.4375 instead of 0.4256)."""
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
        self.c_attn = pe.qkv_projection(config)  # d -> 3d (q, k, v)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # FoX forget gate f_t = sigmoid(w_h . x_t + b_h) per head; GPT's init: w ~ N(0, 0.02^2),
        # b = 0 (f = 1/2), as the official default gate (ForgettingAttentionLayer.fgate_proj)
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
        # the one precision policy (rope.py): the encoding's hooks and every score bias in fp32
        # (fp64 in a float64 model), outside autocast
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dt)
            q, k = pe.rotate(layer, q, k, x, shared, cache)
            # FoX: c_t = sum_{l<=t} log f_l, so that c_i - c_j = sum_{j<l<=i} log f_l, (B, nh, T)
            c = (F.logsigmoid(F.linear(x, self.fgate.weight.to(dt), self.fgate.bias.to(dt)))
                 .transpose(1, 2).cumsum(-1) if self.fgate is not None else None)
            if cache is not None:  # KV-cached decoding: earlier tokens' keys, already rotated
                if 'k' in cache:
                    k, v = torch.cat((cache['k'], k), dim=2), torch.cat((cache['v'], v), dim=2)
                    c = None if c is None else torch.cat(  # the running sum goes on
                        (cache['fgate_c'], cache['fgate_c'][..., -1:] + c), dim=2)
                cache.update(k=k, v=v, fgate_c=c)
            bias = pe.score_bias(layer, q, k, x, pos, shared, cache)
            if c is not None:  # two copies: FlexAttention's backward takes one index into each
                cq, ck, pe_bias = c[..., -T:].clone(), c, bias
                bias = lambda b, h, i, j: cq[b, h, i] - ck[b, h, j] + (
                    0 if pe_bias is None else pe_bias(b, h, i, j))
        dropout_p = self.dropout if self.training else 0.0
        if bias is not None:
            y = biased_attention(q, k, v, bias, dropout_p)
        else:
            # PoPE's q, k are twice v's width: SDPA's fused kernels take one width (its math path
            # is 1.4x the step on CPU); zeros added to v add zeros to y
            Tk, hv = k.size(2), v.size(-1)
            v = F.pad(v, (0, q.size(-1) - hv)) if q.size(-1) != hv else v
            # KV-cached decoding: the T new queries see every cached key and the new ones before
            mask = None if T in (1, Tk) else torch.ones(T, Tk, dtype=torch.bool,
                                                        device=q.device).tril(Tk - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T == Tk,
                                               dropout_p=dropout_p)[..., :hv]
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs
        return self.resid_dropout(self.c_proj(y))


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
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, pe)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, layer, pe, pos, shared, cache):
        x = x + self.attn(self.ln_1(x), layer, pe, pos, shared, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        # the encoding is built first (its own init), never registered twice, for the layers that
        # have one (nope_every's have NOPE), which it numbers 0, 1, ...: pe_layer[layer]
        nope = [bool(config.nope_every) and (i + 1) % config.nope_every == 0
                for i in range(config.n_layer)]
        self.pe_layer = [None if n else nope[:i].count(False) for i, n in enumerate(nope)]
        self.pe_config = replace(config, n_layer=nope.count(False), nope_every=0)
        self.pe = build_position_encoding(self.pe_config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, NOPE if n else self.pe) for n in nope]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # the encoding keeps the init its paper asks for: it is not in self.transformer
        if config.weight_init == 'gpt2':
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
            self.transformer.apply(self._init_weights)
            for pn, p in self.transformer.named_parameters():
                if pn.endswith('c_proj.weight'):  # scaled init of residual projections, per GPT-2
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        else:  # 'pytorch': the modules hold their defaults already; biases start at zero
            for module in self.transformer.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    torch.nn.init.zeros_(module.bias)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the encoding's position tables (`learned`'s
        wpe, as nanoGPT); a tied wte counts: it is lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for m in self.pe.modules() if isinstance(m, nn.Embedding))
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
        """idx, targets: (B, T) (-1: not scored); cache: a dict per layer (generate) or None.
        Returns logits (B, T, vocab) and the mean loss; without targets (B, 1, vocab), None."""
        B, T = idx.size()
        start = pos_offset + (cache[0]['k'].size(2) if cache and 'k' in cache[0] else 0)
        self.check_length(start + T)
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,) int64
        x = self.transformer.drop(self.pe.embed(self.transformer.wte(idx), pos))  # (B, T, C)
        with torch.autocast(device_type=x.device.type, enabled=False):  # rope.py's fp32 policy
            shared = self.pe.prepare(x.to(torch.promote_types(x.dtype, torch.float32)), pos)
        for layer, block in enumerate(self.transformer.h):
            i = self.pe_layer[layer]  # the encoding's number for this layer, None: NoPE
            x = block(x, i, NOPE if i is None else self.pe, pos, shared,
                      cache[layer] if cache is not None else None)
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
        if self.pe.max_len is not None and end > self.pe.max_len:  # position end-1 is asked for
            raise ValueError(f"pos_emb={self.config.pos_emb!r} has only {self.pe.max_len} "
                             f"positions {self.pe.max_len_why} but position {end - 1} was asked "
                             f"for: keep prompt + new tokens (+ pos_offset) <= {self.pe.max_len}, "
                             f"or train an encoding without this limit (rope, none, ...)")

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
        """Forward + backward FLOPs per token (PaLM appendix B): 6N for the matmuls + 12 L H Q T for
        attention + what the encoding adds (pe.extra_flops). N counts the matmuls actually run:
        CRoPE's q/k/v weights are half the parameters, a full matmul; an untied wte is a lookup."""
        cfg = self.config
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        qkv_params = sum(p.numel() for b in self.transformer.h for p in b.attn.c_attn.parameters())
        qkv_matmul = L * (3 * cfg.n_embd * cfg.n_embd + (3 * cfg.n_embd if cfg.bias else 0))
        lookup = (0 if self.transformer.wte.weight is self.lm_head.weight
                  else self.transformer.wte.weight.numel())
        return (6 * (self.get_num_params() - lookup - qkv_params + qkv_matmul)
                + 12 * L * H * Q * seq_len + self.pe.extra_flops(self.pe_config, seq_len))

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
        """Continue idx (B, T) by max_new_tokens tokens sampled from softmax(logits / temperature)
        over the top_k most likely (None: all); temperature=0 is greedy. vocab_limit: the
        tokenizer's size (vocab_size's padding ids never appear). As in nanoGPT the model sees at
        most the last block_size tokens: use_cache=False recomputes them every step; use_cache=True
        keeps each layer's keys, values and encoding state and feeds one token a step, and once
        block_size keys are cached a pe.relative encoding drops the oldest (a banded causal mask),
        an absolute one recomputes the window. extrapolate=True never crops (length
        extrapolation). pos_offset shifts every position."""
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
                        c.update({n: t[:, :, 1:] for n, t in c.items() if n in ('k', 'v', 'fgate_c')
                                  and t is not None})
                    dropped += 1
                else:  # absolute positions: recompute the window at 0..block_size-1 from now on
                    cache = None
            feed = idx_next if cache is not None else idx if extrapolate else idx[:, -W:]
        return idx
