"""EnCodec 24 kHz (the ``encodec`` package's model) as pure functions over a parameter tree.

Layout follows PyTorch so conversion is a plain copy (weight norm folded): activations are
(batch, channels, time) and convolution kernels (out, in, kernel), transposed-convolution
kernels (in, out, kernel). The SEANet structure (which Sequential index holds which layer)
is described once by :func:`layers`, used both to build the expected parameter shapes and
to run the network.

Semantics kept from the reference: causal convolutions pad on the left with reflection
(plus zero "extra" padding on the right so the last window is full), transposed
convolutions trim ``kernel - stride`` samples on the right, residual blocks use a 1x1
convolution shortcut, ELU activations, a 2-layer LSTM with a skip connection, and a
residual vector quantizer whose decoding is the in-order sum of codebook vectors.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mvjax.nn.lstm import lstm_layer, lstm_shapes


@dataclasses.dataclass(frozen=True)
class EncodecConfig:
    """SEANet hyperparameters; the defaults are the released 24 kHz model's."""

    sample_rate: int = 24000
    channels: int = 1
    dimension: int = 128
    n_filters: int = 32
    ratios: tuple[int, ...] = (8, 5, 4, 2)  # decoder order (upsampling); the encoder reverses them
    n_residual_layers: int = 1
    residual_kernel_size: int = 3
    dilation_base: int = 2
    kernel_size: int = 7
    last_kernel_size: int = 7
    compress: int = 2
    lstm_layers: int = 2
    n_q: int = 32
    bins: int = 1024
    causal: bool = True
    trim_right_ratio: float = 1.0

    @property
    def hop_length(self) -> int:
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sample_rate / self.hop_length)

    def codebooks_for_bandwidth(self, kbps: float) -> int:
        """Number of codebooks the reference uses at a target bandwidth (kbps)."""
        per_q = math.log2(self.bins) * self.frame_rate / 1000.0
        return int(max(1, math.floor(kbps / per_q)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratios"] = list(self.ratios)
        return d

    @classmethod
    def from_dict(cls, d) -> "EncodecConfig":
        d = dict(d)
        d["ratios"] = tuple(d["ratios"])
        return cls(**d)


# --- Structure ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
    index: str  # the Sequential index in the reference (the parameter tree key)
    kind: str  # conv | convtr | resblock | lstm | elu
    cin: int = 0
    cout: int = 0
    kernel: int = 1
    stride: int = 1
    dilation: int = 1


def layers(cfg: EncodecConfig, part: str) -> list[Layer]:
    """The reference's ``encoder.model`` / ``decoder.model`` Sequential, index by index."""
    out: list[Layer] = []
    f = cfg.n_filters

    def add(kind, **kw):
        out.append(Layer(str(len(out)), kind, **kw))

    def resblocks(dim):
        for j in range(cfg.n_residual_layers):
            add("resblock", cin=dim, cout=dim, kernel=cfg.residual_kernel_size, dilation=cfg.dilation_base**j)

    if part == "encoder":
        mult = 1
        add("conv", cin=cfg.channels, cout=f, kernel=cfg.kernel_size)
        for ratio in reversed(cfg.ratios):
            resblocks(mult * f)
            add("elu")
            add("conv", cin=mult * f, cout=mult * f * 2, kernel=ratio * 2, stride=ratio)
            mult *= 2
        if cfg.lstm_layers:
            add("lstm", cin=mult * f, cout=mult * f)
        add("elu")
        add("conv", cin=mult * f, cout=cfg.dimension, kernel=cfg.last_kernel_size)
    elif part == "decoder":
        mult = 2 ** len(cfg.ratios)
        add("conv", cin=cfg.dimension, cout=mult * f, kernel=cfg.kernel_size)
        if cfg.lstm_layers:
            add("lstm", cin=mult * f, cout=mult * f)
        for ratio in cfg.ratios:
            add("elu")
            add("convtr", cin=mult * f, cout=mult * f // 2, kernel=ratio * 2, stride=ratio)
            resblocks(mult * f // 2)
            mult //= 2
        add("elu")
        add("conv", cin=f, cout=cfg.channels, kernel=cfg.last_kernel_size)
    else:
        raise ValueError(part)
    return out


def _conv_shapes(cout, cin, k, transposed=False) -> dict:
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return {"weight": spec(cin, cout, k) if transposed else spec(cout, cin, k), "bias": spec(cout)}


def abstract_params(cfg: EncodecConfig) -> dict:
    tree: dict = {}
    for part in ("encoder", "decoder"):
        sub = {}
        for layer in layers(cfg, part):
            if layer.kind == "conv":
                sub[layer.index] = _conv_shapes(layer.cout, layer.cin, layer.kernel)
            elif layer.kind == "convtr":
                sub[layer.index] = _conv_shapes(layer.cout, layer.cin, layer.kernel, transposed=True)
            elif layer.kind == "resblock":
                hidden = layer.cin // cfg.compress
                sub[layer.index] = {
                    "block": {"1": _conv_shapes(hidden, layer.cin, layer.kernel), "3": _conv_shapes(layer.cin, hidden, 1)},
                    "shortcut": _conv_shapes(layer.cin, layer.cin, 1),
                }
            elif layer.kind == "lstm":
                sub[layer.index] = {f"lstm_{k}": lstm_shapes(layer.cin, layer.cin) for k in range(cfg.lstm_layers)}
        tree[part] = sub
    tree["quantizer"] = {"codebooks": jax.ShapeDtypeStruct((cfg.n_q, cfg.bins, cfg.dimension), jnp.float32)}
    return tree


# --- Building blocks ---------------------------------------------------------------------


def _extra_padding(length: int, kernel: int, stride: int, padding_total: int) -> int:
    frames = (length - kernel + padding_total) / stride + 1
    ideal = (math.ceil(frames) - 1) * stride + (kernel - padding_total)
    return ideal - length


def _pad_reflect(x, left: int, right: int):
    """Reflect padding that also works when the input is shorter than the padding (zero-extend first)."""
    length = x.shape[-1]
    extra = max(0, max(left, right) - length + 1) if length <= max(left, right) else 0
    if extra:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
    y = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(left, right)], mode="reflect")
    return y[..., : y.shape[-1] - extra] if extra else y


def conv1d(x, p, stride: int = 1, dilation: int = 1):
    y = jax.lax.conv_general_dilated(
        x, p["weight"], (stride,), [(0, 0)], rhs_dilation=(dilation,), dimension_numbers=("NCH", "OIH", "NCH"),
    )
    return y + p["bias"][None, :, None]


def conv_transpose1d(x, p, stride: int):
    """torch.nn.ConvTranspose1d (padding 0): output length (T - 1) * stride + kernel."""
    w = p["weight"]  # (in, out, k)
    k = w.shape[-1]
    kernel = jnp.flip(jnp.swapaxes(w, 0, 1), axis=-1)  # (out, in, k), flipped
    y = jax.lax.conv_general_dilated(
        x, kernel, (1,), [(k - 1, k - 1)], lhs_dilation=(stride,), dimension_numbers=("NCH", "OIH", "NCH"),
    )
    return y + p["bias"][None, :, None]


def sconv1d(cfg: EncodecConfig, x, p, kernel: int, stride: int = 1, dilation: int = 1):
    padding_total = (kernel - 1) * dilation - (stride - 1)
    extra = _extra_padding(x.shape[-1], kernel, stride, padding_total)
    if cfg.causal:
        x = _pad_reflect(x, padding_total, extra)
    else:
        right = padding_total // 2
        x = _pad_reflect(x, padding_total - right, right + extra)
    return conv1d(x, p, stride, dilation)


def sconv_transpose1d(cfg: EncodecConfig, x, p, kernel: int, stride: int):
    y = conv_transpose1d(x, p, stride)
    padding_total = kernel - stride
    if cfg.causal:
        right = math.ceil(padding_total * cfg.trim_right_ratio)
    else:
        right = padding_total // 2
    left = padding_total - right
    return y[..., left : y.shape[-1] - right]


def _run(cfg: EncodecConfig, part: str, params, x):
    for layer in layers(cfg, part):
        p = params.get(layer.index)
        if layer.kind == "elu":
            x = jax.nn.elu(x)
        elif layer.kind == "conv":
            x = sconv1d(cfg, x, p, layer.kernel, layer.stride, layer.dilation)
        elif layer.kind == "convtr":
            x = sconv_transpose1d(cfg, x, p, layer.kernel, layer.stride)
        elif layer.kind == "resblock":
            h = sconv1d(cfg, jax.nn.elu(x), p["block"]["1"], layer.kernel, 1, layer.dilation)
            h = sconv1d(cfg, jax.nn.elu(h), p["block"]["3"], 1)
            x = sconv1d(cfg, x, p["shortcut"], 1) + h
        elif layer.kind == "lstm":
            seq = jnp.transpose(x, (2, 0, 1))  # (T, B, C)
            y = seq
            for k in range(cfg.lstm_layers):
                y = lstm_layer(p[f"lstm_{k}"], y)
            x = jnp.transpose(y + seq, (1, 2, 0))
    return x


# --- Public functions --------------------------------------------------------------------


def decode_latent(cfg: EncodecConfig, params, latent):
    """latent (B, dimension, frames) -> waveform (B, channels, frames * hop)."""
    return _run(cfg, "decoder", params["decoder"], latent.astype(jnp.float32))


def encode_latent(cfg: EncodecConfig, params, wav):
    """waveform (B, channels, samples) -> latent (B, dimension, frames)."""
    return _run(cfg, "encoder", params["encoder"], wav.astype(jnp.float32))


def codes_to_latent(params, codes):
    """codes (B, n, frames) -> latent (B, dimension, frames): codebook vectors summed in order."""
    books = params["quantizer"]["codebooks"]
    total = jnp.zeros((codes.shape[0], codes.shape[2], books.shape[-1]), jnp.float32)
    for q in range(codes.shape[1]):
        total = total + books[q][codes[:, q]]
    return jnp.swapaxes(total, 1, 2)


def latent_to_codes(params, latent, n_q: int):
    """Residual quantisation with the first ``n_q`` codebooks: latent (B, D, T) -> codes (B, n_q, T)."""
    books = params["quantizer"]["codebooks"]
    residual = jnp.swapaxes(latent.astype(jnp.float32), 1, 2)  # (B, T, D)
    codes = []
    for q in range(n_q):
        embed = books[q]  # (bins, D)
        scores = 2.0 * jnp.einsum("btd,kd->btk", residual, embed)
        dist = -(jnp.sum(residual**2, -1, keepdims=True) - scores + jnp.sum(embed**2, -1)[None, None])
        index = jnp.argmax(dist, axis=-1)
        codes.append(index)
        residual = residual - embed[index]
    return jnp.stack(codes, axis=1)


def decode_codes(cfg: EncodecConfig, params, codes):
    """EnCodec codes (B, n, frames) -> waveform (B, channels, frames * hop)."""
    return decode_latent(cfg, params, codes_to_latent(params, codes))


def encode_wav(cfg: EncodecConfig, params, wav, bandwidth_kbps: float = 6.0):
    """waveform (B, channels, samples) -> codes (B, n_q(bandwidth), frames)."""
    return latent_to_codes(params, encode_latent(cfg, params, wav), cfg.codebooks_for_bandwidth(bandwidth_kbps))
