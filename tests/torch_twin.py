"""A small PyTorch twin of the reference MetaVoice ``GPT`` (same state-dict keys and semantics).

Written for these tests from the reference's documented behaviour: pre-norm blocks,
fused q|k|v projection, torch SDPA (causal or not), RMSNorm or LayerNorm (eps 1e-5,
optional bias), SwiGLU with the hidden size rounded up to a multiple or exact-erf
GELU, summed input tables, learned positions, a speaker projection added at every
position (masked before the first token 1537 when ``spk_emb_on_text`` is False),
heads tied to the input tables for the causal model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as tnn
import torch.nn.functional as F


class TwinRMSNorm(tnn.Module):
    def __init__(self, width, eps):
        super().__init__()
        self.eps = eps
        self.weight = tnn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TwinLayerNorm(tnn.Module):
    def __init__(self, width, bias):
        super().__init__()
        self.weight = tnn.Parameter(torch.ones(width))
        self.bias = tnn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def _norm(a):
    return TwinRMSNorm(a["n_embd"], a["rmsnorm_eps"]) if a["norm_type"] == "rmsnorm" else TwinLayerNorm(a["n_embd"], a["bias"])


class TwinSwiGLU(tnn.Module):
    def __init__(self, d, h, bias):
        super().__init__()
        self.w1 = tnn.Linear(d, h, bias=bias)
        self.w3 = tnn.Linear(d, h, bias=bias)


class TwinMLP(tnn.Module):
    def __init__(self, a):
        super().__init__()
        d, hidden = a["n_embd"], 4 * a["n_embd"]
        self.kind = a["nonlinearity_type"]
        if self.kind == "gelu":
            self.c_fc = tnn.Linear(d, hidden, bias=a["bias"])
        else:
            hidden = a["swiglu_multiple_of"] * math.ceil(int(2 * hidden / 3) / a["swiglu_multiple_of"])
            self.swiglu = TwinSwiGLU(d, hidden, a["bias"])
        self.c_proj = tnn.Linear(hidden, d, bias=a["bias"])

    def forward(self, x):
        if self.kind == "gelu":
            h = F.gelu(self.c_fc(x))
        else:
            h = F.silu(self.swiglu.w1(x)) * self.swiglu.w3(x)
        return self.c_proj(h)


class TwinAttention(tnn.Module):
    def __init__(self, a):
        super().__init__()
        self.n_head, self.causal = a["n_head"], a["causal"]
        self.c_attn = tnn.Linear(a["n_embd"], 3 * a["n_embd"], bias=a["bias"])
        self.c_proj = tnn.Linear(a["n_embd"], a["n_embd"], bias=a["bias"])

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.n_head, c // self.n_head).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class TwinBlock(tnn.Module):
    def __init__(self, a):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = _norm(a), TwinAttention(a), _norm(a), TwinMLP(a)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TwinGPT(tnn.Module):
    def __init__(self, a: dict, speaker_emb_dim: int | None):
        super().__init__()
        self.a = a
        self.transformer = tnn.ModuleDict(
            dict(
                wtes=tnn.ModuleList([tnn.Embedding(v, a["n_embd"]) for v in a["vocab_sizes"]]),
                wpe=tnn.Embedding(a["block_size"], a["n_embd"]),
                h=tnn.ModuleList([TwinBlock(a) for _ in range(a["n_layer"])]),
                ln_f=_norm(a),
            )
        )
        if speaker_emb_dim is not None:
            self.speaker_cond_pos = tnn.Linear(speaker_emb_dim, a["n_embd"], bias=False)
        heads = a["vocab_sizes"] if a["target_vocab_sizes"] is None else a["target_vocab_sizes"]
        self.lm_heads = tnn.ModuleList([tnn.Linear(a["n_embd"], v, bias=False) for v in heads])
        if a["target_vocab_sizes"] is None:
            for i, wte in enumerate(self.transformer.wtes):
                self.lm_heads[i].weight = wte.weight
        with torch.no_grad():  # non-trivial norms so that a swapped scale/bias would show
            for name, p in self.named_parameters():
                if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    p.uniform_(0.5, 1.5)
                elif name.endswith(("ln_1.bias", "ln_2.bias", "ln_f.bias")):
                    p.uniform_(-0.2, 0.2)

    def forward(self, idx, speaker_embs=None):
        b, _, t = idx.shape
        x = torch.zeros(b, t, self.a["n_embd"])
        for i, wte in enumerate(self.transformer.wtes):
            x = x + wte(idx[:, i, :])
        x = x + self.transformer.wpe(torch.arange(t))
        if speaker_embs is not None:
            spk = self.speaker_cond_pos(speaker_embs)[:, None, :]
            if not self.a["spk_emb_on_text"]:
                seen = (torch.cumsum(idx[:, 0, :] == 1537, dim=-1) > 0).float()
                spk = spk * seen[:, :, None]
            x = x + spk
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return [head(x) for head in self.lm_heads]


def model_args(**overrides) -> dict:
    args = dict(
        block_size=32, vocab_sizes=[40], target_vocab_sizes=None, n_layer=2, n_head=2, n_embd=16,
        dropout=0.0, spkemb_dropout=0.0, bias=False, causal=True, spk_emb_on_text=True,
        norm_type="rmsnorm", rmsnorm_eps=1e-5, nonlinearity_type="swiglu", swiglu_multiple_of=32,
        attn_kernel_type="torch_attn", kv_cache_enabled=False,
    )
    args.update(overrides)
    return args


def tokenizer_meta(offset: int) -> dict:
    ranks = {bytes([i]): i for i in range(256)}
    return {
        "name": "twin_bytes",
        "pat_str": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        "mergeable_ranks": ranks,
        "special_tokens": {"<|endoftext|>": 256},
        "offset": offset,
    }


def save_checkpoint(path, args: dict, seed: int = 0, speaker_emb_dim: int | None = 8, dtype=None, prefix: str = ""):
    """Build a random twin, ``torch.save`` it in the released layout, return the twin (float32)."""
    torch.manual_seed(seed)
    model = TwinGPT(args, speaker_emb_dim).eval()
    state = model.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict({k: v.float() for k, v in state.items()})
    state = {prefix + k: v for k, v in state.items()}
    meta = {"tokenizer": tokenizer_meta(offset=0)}
    if speaker_emb_dim is not None:
        meta.update(speaker_cond=True, speaker_emb_size=speaker_emb_dim)
    torch.save({"model": state, "model_args": args, "config": {"causal": args["causal"]}, "meta": meta}, path)
    return model
