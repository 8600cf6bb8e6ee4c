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

The decoder also runs incrementally with carried state (:func:`decode_stream_step`,
:class:`StreamingDecoder`): the concatenated pieces equal the whole decode within float32 rounding.
The module is long because the whole and the incremental decoder walk the same layer list
(:func:`layers`) with the same padding rules; apart, each would restate the other's.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mvjax.nn.lstm import lstm_layer, lstm_scan, lstm_shapes


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


def _conv_transpose1d_nobias(x, w, stride: int):
    """The weighted sum of torch.nn.ConvTranspose1d without its bias; w (in, out, k)."""
    k = w.shape[-1]
    kernel = jnp.flip(jnp.swapaxes(w, 0, 1), axis=-1)  # (out, in, k), flipped
    return jax.lax.conv_general_dilated(
        x, kernel, (1,), [(k - 1, k - 1)], lhs_dilation=(stride,), dimension_numbers=("NCH", "OIH", "NCH"),
    )


def conv_transpose1d(x, p, stride: int):
    """torch.nn.ConvTranspose1d (padding 0): output length (T - 1) * stride + kernel."""
    return _conv_transpose1d_nobias(x, p["weight"], stride) + p["bias"][None, :, None]


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


# --- Streaming decode --------------------------------------------------------------------
#
# The causal decoder's output sample t depends on its input up to t, with one exception: each
# causal convolution pads its start by reflection, so its first outputs read ``padding`` samples
# ahead. A stream therefore holds its first frames back until every convolution has ``padding + 1``
# input samples (``stream_warmup_frames``), runs those frames padded exactly as the whole decode
# pads them, and from then on carries state: each causal convolution's last ``padding`` input
# samples, each transposed convolution's overlap tail (the ``kernel - stride`` output samples that
# later frames still add to; the causal trim removes exactly these at the right), and the LSTM's
# (h, c) per layer. The state's structure tells the phase: ``{"pending": frames}`` before the first
# run, ``{"layers": {...}}`` after it.


def _check_streamable(cfg: EncodecConfig) -> None:
    if not cfg.causal or cfg.trim_right_ratio != 1.0:
        raise ValueError("streaming decode needs a causal codec that trims transposed convolutions on the right "
                         f"(causal=True, trim_right_ratio=1.0; got {cfg.causal}, {cfg.trim_right_ratio})")
    if any(layer.kind == "conv" and layer.stride != 1 for layer in layers(cfg, "decoder")):
        raise ValueError("streaming decode needs stride-1 convolutions in the decoder")


def stream_warmup_frames(cfg: EncodecConfig) -> int:
    """Frames a stream takes in before its first output: every decoder convolution then has read
    ``padding + 1`` input samples, as its reflected start padding needs (7 for the 24 kHz codec)."""
    rate, need = 1, 1
    for layer in layers(cfg, "decoder"):
        if layer.kind == "convtr":
            rate *= layer.stride
        elif layer.kind in ("conv", "resblock"):
            need = max(need, -(-((layer.kernel - 1) * layer.dilation + 1) // rate))
    return need


# The carried-state steps below write convolutions as matrix products whose weight operand keeps its
# stored layout (contracted dimensions of a (out, in, k) kernel are its minor ones, of an (in, out, k)
# transposed kernel its major one). XLA's CPU convolutions re-lay their kernels out on every call,
# which for a stream's few frames costs more than the arithmetic (18 ms of a 1-frame step went to
# one transposed kernel's copy).


def _conv1d_matmul(x, p, dilation: int):
    """:func:`conv1d` with stride 1 and no padding, as one product over stacked shifted inputs."""
    w = p["weight"]  # (out, in, k)
    cout, cin, kernel = w.shape
    n = x.shape[-1] - (kernel - 1) * dilation
    taps = jnp.stack([x[..., j * dilation : j * dilation + n] for j in range(kernel)], axis=2)  # (B, in, k, n)
    y = jnp.einsum("oc,bcn->bon", w.reshape(cout, cin * kernel), taps.reshape(x.shape[0], cin * kernel, n))
    return y + p["bias"][None, :, None]


def _stream_conv(cfg: EncodecConfig, x, p, kernel: int, dilation: int, tail):
    """A stride-1 causal convolution over new samples; ``tail`` None: the stream's start. -> (y, new tail)."""
    pad = (kernel - 1) * dilation
    if tail is None:
        assert x.shape[-1] > pad, "a stream's first run must cover the convolution's start padding"
        y, inp = sconv1d(cfg, x, p, kernel, 1, dilation), x
    else:
        inp = jnp.concatenate([tail, x], axis=-1)
        y = _conv1d_matmul(inp, p, dilation)
    return y, inp[..., inp.shape[-1] - pad :]


def _conv_transpose1d_matmul(x, w, stride: int):
    """:func:`_conv_transpose1d_nobias` as one product and ``ceil(kernel / stride)`` shifted adds: each input
    sample's ``kernel`` outputs, cut into blocks of ``stride``, land on consecutive output blocks."""
    batch, length = x.shape[0], x.shape[-1]
    cin, cout, kernel = w.shape
    blocks = -(-kernel // stride)
    y = jnp.einsum("bti,in->btn", jnp.swapaxes(x, 1, 2), w.reshape(cin, cout * kernel))
    y = y.reshape(batch, length, cout, kernel)
    if blocks * stride > kernel:
        y = jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, blocks * stride - kernel)))
    y = jnp.transpose(y.reshape(batch, length, cout, blocks, stride), (0, 2, 1, 3, 4))  # (B, out, T, blocks, s)
    out = jnp.zeros((batch, cout, length + blocks - 1, stride), y.dtype)
    for q in range(blocks):
        out = out.at[:, :, q : q + length].add(y[:, :, :, q])
    return out.reshape(batch, cout, -1)[..., : (length - 1) * stride + kernel]


def _stream_convtr(x, p, stride: int, tail):
    """A causal transposed convolution over new frames, overlap-adding ``tail`` (None: zeros). -> (y, new tail)."""
    full = _conv_transpose1d_matmul(x, p["weight"], stride)  # (B, out, n * stride + kernel - stride)
    if tail is not None:
        full = full.at[..., : tail.shape[-1]].add(tail)
    n = x.shape[-1] * stride
    return full[..., :n] + p["bias"][None, :, None], full[..., n:]


def _stream_run(cfg: EncodecConfig, params, x, state):
    """The decoder over new frames from carried ``state`` (None: the first frames). -> (samples, new state)."""
    new = {}
    for layer in layers(cfg, "decoder"):
        p = params.get(layer.index)
        carried = None if state is None else state.get(layer.index)
        if layer.kind == "elu":
            x = jax.nn.elu(x)
        elif layer.kind == "conv":
            x, new[layer.index] = _stream_conv(cfg, x, p, layer.kernel, layer.dilation, carried)
        elif layer.kind == "convtr":
            x, new[layer.index] = _stream_convtr(x, p, layer.stride, carried)
        elif layer.kind == "resblock":
            h, new[layer.index] = _stream_conv(cfg, jax.nn.elu(x), p["block"]["1"], layer.kernel, layer.dilation,
                                               carried)
            h = _conv1d_matmul(jax.nn.elu(h), p["block"]["3"], 1)
            x = _conv1d_matmul(x, p["shortcut"], 1) + h
        elif layer.kind == "lstm":
            seq = jnp.transpose(x, (2, 0, 1))  # (T, B, C)
            y, finals = seq, []
            for k in range(cfg.lstm_layers):
                y, final = lstm_scan(p[f"lstm_{k}"], y, None if carried is None else carried[k])
                finals.append(final)
            new[layer.index] = finals
            x = jnp.transpose(y + seq, (1, 2, 0))
    return x, new


def decode_stream_init(cfg: EncodecConfig, params, batch: int) -> dict:
    """The state of a new stream of ``batch`` rows (no frames yet); see :func:`decode_stream_step`."""
    _check_streamable(cfg)
    del params  # the state's shapes come from the config alone
    return {"pending": jnp.zeros((batch, cfg.dimension, 0), jnp.float32)}


def decode_stream_step(cfg: EncodecConfig, params, state: dict, latent_piece):
    """Decode the next latent frames (B, dimension, F >= 1) of a stream: -> (state, samples (B, channels, S)).

    The samples are those that later frames can no longer change; the concatenated output equals
    :func:`decode_latent` of all frames. The first :func:`stream_warmup_frames` frames (7 for the
    24 kHz codec, i.e. 93 ms of audio) are held back: until the stream has that many, S = 0; the
    call that reaches them emits every frame so far, and each later call F * hop samples. A
    stream that ends before the warm-up gets its audio from :func:`decode_stream_flush`.
    Jittable with ``cfg`` static; jit compiles one program per piece length and phase (holding
    back / first run / steady), so feed pieces of one length (see :class:`StreamingDecoder`).
    """
    x = latent_piece.astype(jnp.float32)
    if "pending" in state:
        x = jnp.concatenate([state["pending"], x], axis=-1)
        if x.shape[-1] < stream_warmup_frames(cfg):
            return {"pending": x}, jnp.zeros((x.shape[0], cfg.channels, 0), jnp.float32)
        y, carried = _stream_run(cfg, params["decoder"], x, None)
    else:
        y, carried = _stream_run(cfg, params["decoder"], x, state["layers"])
    return {"layers": carried}, y


def decode_stream_flush(cfg: EncodecConfig, params, state: dict):
    """The samples a stream still owes at its end: the whole decode of its frames if it ended before the
    warm-up, else none (every sample of a warmed-up stream is final when its frame arrives)."""
    if "pending" in state and state["pending"].shape[-1]:
        return decode_latent(cfg, params, state["pending"])
    batch = jax.tree_util.tree_leaves(state)[0].shape[0]
    return jnp.zeros((batch, cfg.channels, 0), jnp.float32)


_STREAM_STEP = jax.jit(decode_stream_step, static_argnums=0)
_STREAM_FLUSH = jax.jit(decode_stream_flush, static_argnums=0)


class StreamingDecoder:
    """One stream's incremental decoding with jitted steps (compiled programs are shared between instances).

    ``piece_frames``: the network only runs on pieces of exactly this many frames, so it compiles
    twice (the first run and the steady state); frames short of a full piece wait for the next
    push, and the last push (``last=True``) pads its short piece with zero frames and trims the
    result (exact: the decoder is causal, so later frames cannot change earlier samples). None:
    each push runs at once on what it got (one compiled program per distinct length).
    """

    def __init__(self, cfg: EncodecConfig, params, batch: int, piece_frames: int | None = None):
        # On the device once: host (numpy) weights would be copied over on every step.
        self.cfg, self.params, self.piece_frames = cfg, jax.device_put({"decoder": params["decoder"]}), piece_frames
        self.warmup = stream_warmup_frames(cfg)
        self.reset(batch)

    def reset(self, batch: int) -> None:
        """Start a new stream of ``batch`` rows."""
        self.state = decode_stream_init(self.cfg, self.params, batch)
        self.waiting = jnp.zeros((batch, self.cfg.dimension, 0), jnp.float32)  # frames short of a piece
        self.closed = False

    def push(self, latent_piece, last: bool = False):
        """Decode the next frames (B, dimension, F >= 0): -> the samples now final (B, channels, S).
        ``last``: the stream ends with these frames; the output then includes every remaining sample."""
        if self.closed:
            raise RuntimeError("this stream has ended; reset() starts a new one")
        x = jnp.concatenate([self.waiting, jnp.asarray(latent_piece, jnp.float32)], axis=-1)
        size = self.piece_frames or max(1, x.shape[-1])
        usable = x.shape[-1] if last else x.shape[-1] - x.shape[-1] % size
        self.waiting = x[..., usable:]
        outs = []
        for start in range(0, usable, size):
            piece = x[..., start : start + size]
            n = piece.shape[-1]
            if "pending" in self.state and self.state["pending"].shape[-1] + n < self.warmup:
                self.state = {"pending": jnp.concatenate([self.state["pending"], piece], axis=-1)}
                continue
            short = size - n
            if short:
                piece = jnp.pad(piece, ((0, 0), (0, 0), (0, short)))
            self.state, y = _STREAM_STEP(self.cfg, self.params, self.state, piece)
            outs.append(y[..., : y.shape[-1] - short * self.cfg.hop_length])
        if last:
            outs.append(_STREAM_FLUSH(self.cfg, self.params, self.state))
            self.closed = True
        if not outs:
            return jnp.zeros((x.shape[0], self.cfg.channels, 0), jnp.float32)
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
