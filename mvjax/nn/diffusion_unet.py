"""audiocraft's ``DiffusionUnet`` (multi-band diffusion), as pure functions over a parameter tree.

The tree mirrors the PyTorch module hierarchy (``encoders/0/conv/weight`` ...) with
PyTorch layouts: activations (batch, channels, time), Conv1d kernels (out, in, k),
ConvTranspose1d kernels (in, out, k), Linear weights (out, in). Every option of the
checkpoint's ``cfg.diffusion_unet`` is honoured: hidden/depth/growth/max_channels,
kernel/stride, res_blocks, norm_groups, step embeddings on the first or all layers, the
1x1 codec projection added after nearest-neighbour resizing, a bottleneck transformer
(post-norm, ReLU, sinusoidal positions, optional cross-attention to the codec latent), or
a BLSTM, or neither (the bottleneck is then zeroed, as in the reference).

Residual blocks use kernel 3 and dilation 2**i whatever the U-Net's own kernel; encoder
layers right-pad their input to a multiple of the stride first; the codec condition added
at the bottleneck also reaches the deepest skip connection (the reference adds in place).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from mvjax.nn.lstm import lstm_layer

TRANSFORMER_HEADS = 8
TRANSFORMER_LAYERS = 6
TRANSFORMER_FF = 2048
RES_KERNEL = 3


@dataclasses.dataclass(frozen=True)
class UnetConfig:
    chin: int = 1
    hidden: int = 24
    depth: int = 3
    growth: float = 2.0
    max_channels: int = 10_000
    num_steps: int = 1000
    emb_all_layers: bool = False
    cross_attention: bool = False
    bilstm: bool = False
    transformer: bool = False
    codec_dim: Optional[int] = None
    kernel: int = 4
    stride: int = 2
    norm_groups: int = 4
    res_blocks: int = 1

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> "UnetConfig":
        """From a band's plain ``cfg`` (``cfg.diffusion_unet`` plus ``channels`` and ``schedule.num_steps``)."""
        unet = dict(cfg["diffusion_unet"])
        unet.pop("dropout", None)  # inference only
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(unet) - known)
        if unknown:
            raise ValueError(f"unsupported diffusion_unet options: {', '.join(unknown)}")
        return cls(chin=int(cfg.get("channels", 1)), num_steps=int(cfg["schedule"]["num_steps"]), **unet)

    def channels(self) -> list[tuple[int, int]]:
        """(chin, chout) of each encoder level."""
        out, chin, hidden = [], self.chin, self.hidden
        for _ in range(self.depth):
            out.append((chin, hidden))
            chin = hidden
            hidden = min(int(chin * self.growth), self.max_channels)
        return out

    @property
    def bottleneck(self) -> int:
        return self.channels()[-1][1]


def abstract_params(cfg: UnetConfig) -> dict:
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    norm = lambda c: {"weight": f32(c), "bias": f32(c)}

    def res_blocks(c):
        return {
            str(i): {"norm1": norm(c), "conv1": {"weight": f32(c, c, RES_KERNEL), "bias": f32(c)},
                     "norm2": norm(c), "conv2": {"weight": f32(c, c, RES_KERNEL), "bias": f32(c)}}
            for i in range(cfg.res_blocks)
        }

    levels = cfg.channels()
    tree: dict = {
        "encoders": {
            str(d): {"conv": {"weight": f32(cout, cin, cfg.kernel)}, "norm": norm(cout), "res_blocks": res_blocks(cout)}
            for d, (cin, cout) in enumerate(levels)
        },
        # decoders[0] is the deepest level (the reference inserts at the front).
        "decoders": {
            str(i): {"res_blocks": res_blocks(cout), "norm": norm(cout), "convtr": {"weight": f32(cout, cin, cfg.kernel)}}
            for i, (cin, cout) in enumerate(reversed(levels))
        },
        "embedding": {"weight": f32(cfg.num_steps, cfg.hidden)},
    }
    if cfg.emb_all_layers and cfg.depth > 1:
        tree["embeddings"] = {str(d - 1): {"weight": f32(cfg.num_steps, levels[d][1])} for d in range(1, cfg.depth)}
    c = cfg.bottleneck
    if cfg.bilstm:
        tree["bilstm"] = {"lstm": {}, "linear": {"weight": f32(c, 2 * c), "bias": f32(c)}}
        for k in range(2):
            for suffix in ("", "_reverse"):
                cin = c if k == 0 else 2 * c
                tree["bilstm"]["lstm"].update({
                    f"weight_ih_l{k}{suffix}": f32(4 * c, cin), f"weight_hh_l{k}{suffix}": f32(4 * c, c),
                    f"bias_ih_l{k}{suffix}": f32(4 * c), f"bias_hh_l{k}{suffix}": f32(4 * c),
                })
    if cfg.transformer:
        def attention():
            return {"mha": {"in_proj_weight": f32(3 * c, c), "out_proj": {"weight": f32(c, c)}}}

        layers = {}
        for i in range(TRANSFORMER_LAYERS):
            layer = {
                "self_attn": attention(),
                "linear1": {"weight": f32(TRANSFORMER_FF, c)},
                "linear2": {"weight": f32(c, TRANSFORMER_FF)},
                "norm1": norm(c),
                "norm2": norm(c),
            }
            if cfg.cross_attention:
                layer["cross_attention"] = attention()
                layer["norm_cross"] = norm(c)
            layers[str(i)] = layer
        tree["transformer"] = {"layers": layers}
    if cfg.codec_dim is not None:
        tree["conv_codec"] = {"weight": f32(c, cfg.codec_dim, 1), "bias": f32(c)}
    return tree


# --- Layers ------------------------------------------------------------------------------


def _conv(x, p, stride=1, padding=0, dilation=1):
    y = jax.lax.conv_general_dilated(x, p["weight"], (stride,), [(padding, padding)], rhs_dilation=(dilation,),
                                     dimension_numbers=("NCH", "OIH", "NCH"))
    return y + p["bias"][None, :, None] if "bias" in p else y


def _conv_transpose(x, p, stride, padding):
    """torch ConvTranspose1d(stride, padding): length (T - 1) * stride - 2 * padding + k."""
    w = p["weight"]
    k = w.shape[-1]
    kernel = jnp.flip(jnp.swapaxes(w, 0, 1), axis=-1)
    return jax.lax.conv_general_dilated(x, kernel, (1,), [(k - 1 - padding, k - 1 - padding)], lhs_dilation=(stride,),
                                        dimension_numbers=("NCH", "OIH", "NCH"))


def _group_norm(x, p, groups, eps=1e-5):
    b, c, t = x.shape
    g = x.reshape(b, groups, c // groups, t)
    mean = jnp.mean(g, axis=(2, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(2, 3), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(b, c, t)
    return y * p["weight"][None, :, None] + p["bias"][None, :, None]


def _layer_norm(x, p, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["weight"] + p["bias"]


def _res_blocks(cfg: UnetConfig, x, blocks):
    for i in range(cfg.res_blocks):
        p = blocks[str(i)]
        dilation = 2**i
        padding = dilation * (RES_KERNEL - 1) // 2
        h = _conv(jax.nn.relu(_group_norm(x, p["norm1"], cfg.norm_groups)), p["conv1"], padding=padding, dilation=dilation)
        h = _conv(jax.nn.relu(_group_norm(h, p["norm2"], cfg.norm_groups)), p["conv2"], padding=padding, dilation=dilation)
        x = x + h
    return x


def _mha(p, query, key, heads):
    """nn.MultiheadAttention without biases, batch first: (B, Tq, C), (B, Tk, C) -> (B, Tq, C)."""
    c = query.shape[-1]
    w = p["in_proj_weight"]
    q = query @ w[:c].T
    k = key @ w[c:2 * c].T
    v = key @ w[2 * c:].T
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, c // heads)
    q, k, v = split(q), split(k), split(v)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(c // heads))
    y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(query.shape)
    return y @ p["out_proj"]["weight"].T


def sin_embedding(length: int, dim: int, max_period: float = 10_000.0):
    """audiocraft's create_sin_embedding: cat([cos, sin]) of positions / max_period ** (i / (half - 1))."""
    half = dim // 2
    positions = jnp.arange(length, dtype=jnp.float32)[:, None]
    phase = positions / (jnp.float32(max_period) ** (jnp.arange(half, dtype=jnp.float32) / (half - 1)))
    return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1)


def _transformer(cfg: UnetConfig, p, x, cross_src):
    """Post-norm StreamingTransformer (8 heads, 6 layers, ReLU feed-forward of 2048, no biases). x: (B, T, C)."""
    x = x + sin_embedding(x.shape[1], x.shape[2])[None]
    for i in range(TRANSFORMER_LAYERS):
        lp = p["layers"][str(i)]
        src = x
        x = _layer_norm(x + _mha(lp["self_attn"]["mha"], x, x, TRANSFORMER_HEADS), lp["norm1"])
        if cross_src is not None:
            # The reference's post-norm branch attends from the layer's *input*, not x.
            x = _layer_norm(x + _mha(lp["cross_attention"]["mha"], src, cross_src, TRANSFORMER_HEADS), lp["norm_cross"])
        ff = jax.nn.relu(x @ lp["linear1"]["weight"].T) @ lp["linear2"]["weight"].T
        x = _layer_norm(x + ff, lp["norm2"])
    return x


def _bilstm(p, x):
    """2-layer bidirectional LSTM + Linear(2C -> C). x: (B, C, T)."""
    seq = jnp.transpose(x, (2, 0, 1))
    lstm = p["lstm"]
    for k in range(2):
        def params(suffix):
            return {"w_ih": lstm[f"weight_ih_l{k}{suffix}"].T, "w_hh": lstm[f"weight_hh_l{k}{suffix}"].T,
                    "b_ih": lstm[f"bias_ih_l{k}{suffix}"], "b_hh": lstm[f"bias_hh_l{k}{suffix}"]}

        forward = lstm_layer(params(""), seq)
        backward = lstm_layer(params("_reverse"), seq[::-1])[::-1]
        seq = jnp.concatenate([forward, backward], axis=-1)
    y = seq @ p["linear"]["weight"].T + p["linear"]["bias"]
    return jnp.transpose(y, (1, 2, 0))


def _nearest_resize(x, size: int):
    """F.interpolate(x, size) in its default 'nearest' mode: index floor(i * in / out)."""
    src = x.shape[-1]
    index = (jnp.arange(size) * src) // size
    return x[..., index]


def unet_apply(cfg: UnetConfig, params, x, step, condition=None):
    """Noise estimate for ``x`` (B, chin, T) at diffusion ``step`` (int or (B,) ints), conditioned on the codec latent."""
    batch = x.shape[0]
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (batch,))
    skips = []
    z = x
    for d in range(cfg.depth):
        p = params["encoders"][str(d)]
        pad = (cfg.stride - z.shape[-1] % cfg.stride) % cfg.stride
        z = jnp.pad(z, ((0, 0), (0, 0), (0, pad)))
        z = _conv(z, p["conv"], stride=cfg.stride, padding=(cfg.kernel - cfg.stride) // 2)
        z = jax.nn.relu(_group_norm(z, p["norm"], cfg.norm_groups))
        z = _res_blocks(cfg, z, p["res_blocks"])
        if d == 0:
            z = z + params["embedding"]["weight"][steps][:, :, None]
        elif cfg.emb_all_layers:
            z = z + params["embeddings"][str(d - 1)]["weight"][steps][:, :, None]
        skips.append(z)
    cross_src = None
    if cfg.codec_dim is not None:
        if condition is None:
            raise ValueError("this U-Net is conditioned on the codec latent: pass condition")
        cond = _conv(condition, params["conv_codec"])
        if not cfg.cross_attention:
            z = z + _nearest_resize(cond, z.shape[-1])
            # The reference adds in place (``z += ...``) to the tensor it also stored as the
            # deepest skip connection, so that skip carries the condition too.
            skips[-1] = z
        else:
            cross_src = jnp.swapaxes(cond, 1, 2)
            cross_src = cross_src + sin_embedding(cross_src.shape[1], cross_src.shape[2])[None]
    if cfg.transformer:
        z = jnp.swapaxes(_transformer(cfg, params["transformer"], jnp.swapaxes(z, 1, 2), cross_src), 1, 2)
    elif cfg.bilstm:
        z = _bilstm(params["bilstm"], z)
    else:
        z = jnp.zeros_like(z)
    for i in range(cfg.depth):
        p = params["decoders"][str(i)]
        s = skips.pop()
        z = z[:, :, : s.shape[2]] + s
        z = _res_blocks(cfg, z, p["res_blocks"])
        z = jax.nn.relu(_group_norm(z, p["norm"], cfg.norm_groups))
        z = _conv_transpose(z, p["convtr"], cfg.stride, (cfg.kernel - cfg.stride) // 2)
    return z[:, :, : x.shape[2]]
