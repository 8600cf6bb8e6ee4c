"""Multi-band diffusion decoded in windows while a chunk's frames arrive (streaming).

Frames are cut into windows of ``window`` (W) frames after a first one of W + ``overlap`` (O):
window k's core is frames [O + kW, O + (k+1)W) (the first starts at 0). Each window is
diffused over its core, O frames of left context and ``lookahead`` (R) frames of right
context, W + O + R frames in all, so it runs once O + (k+1)W + R frames have arrived; the
window that holds the chunk's last frame runs at the end, with more left context to keep the
same length. Every window thus has one shape (one compiled program), except in a chunk shorter
than W + O + R, whose windows (more than one when it is longer than W + O) each span all of it.

Noise: each window takes its samples' noise from the row's draw (``noises``: :func:`row_noise`, or
:class:`RowNoise` drawing it as the chunk grows), sliced at the window's samples, so a sample's
noise does not depend on the windowing or on the chunk's length; it is the noise the whole decode
gives that sample. A window covering the whole chunk is the whole decode.

Join: a window's left context covers the previous window's last O frames, which that
window held back; the two are crossfaded there (``fade="power"``: equal-power cos/sin gains
as between chunks; ``"amplitude"``: cos^2/sin^2 gains, which sum to one and so keep the
level where the two windows agree, as windows diffused from the same noise mostly do).
A window's last O frames are final once the next window has run.

Re-EQ (the whole decode matches each of 32 bands' deviation to the plain codec decoding):
``eq="running"`` matches each window to the band statistics of all core samples so far
(diffused and codec, the window's own core included), which at the chunk's end are the
whole chunk's; ``"window"`` matches each window alone (:func:`re_eq` over its span);
``"none"`` leaves the diffused sum as it is (apply :func:`re_eq` to the joined result).
Either way the codec decoding of a window's frames must have arrived with them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

from mvjax.audio.bands import split_bands
from mvjax.audio.finish import equal_power_fade
from mvjax.inference.diffusion import EQ_BANDS, MultiBandDiffusion, re_eq, time_major_noise

EQ_MODES = ("running", "window", "none")
FADES = ("power", "amplitude")


@dataclasses.dataclass(frozen=True)
class WindowSettings:
    """Window geometry in frames and how windows are matched and joined (see the module). The defaults
    are the choice of benchmarks/RESULTS.md (fixture model: 19.8 dB SI-SDR against the whole decode,
    first audio after 24 frames, 1.6x the whole decode's frames diffused)."""

    window: int = 16
    overlap: int = 4
    lookahead: int = 4
    eq: str = "running"
    fade: str = "amplitude"

    def __post_init__(self):
        if self.window < 1 or not 0 <= self.overlap <= self.window or self.lookahead < 0:
            raise ValueError(f"need window >= 1, 0 <= overlap <= window, lookahead >= 0: {self}")
        if self.eq not in EQ_MODES or self.fade not in FADES:
            raise ValueError(f"eq must be one of {EQ_MODES}, fade one of {FADES}: {self}")

    @property
    def span(self) -> int:
        """Frames diffused per window; also the frames needed before the first audio (W frames of it)."""
        return self.window + self.overlap + self.lookahead

    @property
    def max_delay(self) -> int:
        """Most frames that arrive after a frame before its audio is final (O + R for a window's last frame)."""
        return self.window - 1 + self.overlap + self.lookahead


def amplitude_fade(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
    """``tail`` faded out into ``head`` (equally long, (..., n)) with cos^2/sin^2 gains (summing to one)."""
    n = tail.shape[-1]
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    return (tail * np.cos(t * np.pi / 2) ** 2 + head * np.sin(t * np.pi / 2) ** 2).astype(np.float32)


def row_noise(diffusion: MultiBandDiffusion, row_key, samples: int, channels: int = 1) -> np.ndarray:
    """One row's noise (draws, channels, samples), as ``generate(row_keys=...)`` draws it for that row in
    a batch of any length (a sample's noise does not depend on ``samples``)."""
    return np.asarray(time_major_noise(jnp.asarray(row_key), diffusion.noise_count(), channels, samples))


class RowNoise:
    """One row's noise drawn on demand: ``noise(n)`` is :func:`row_noise` for ``n`` samples, for a stream
    that does not know its length. Draws grow in powers of two (few programs to compile), each
    extending the last."""

    def __init__(self, diffusion: MultiBandDiffusion, row_key, channels: int = 1, minimum: int = 1 << 15):
        self.diffusion, self.key, self.channels, self.minimum = diffusion, row_key, channels, minimum
        self._drawn = np.zeros((diffusion.noise_count(), channels, 0), np.float32)

    def __call__(self, samples: int) -> np.ndarray:
        if samples > self._drawn.shape[-1]:
            n = max(self.minimum, 1 << max(samples - 1, 1).bit_length())
            self._drawn = row_noise(self.diffusion, self.key, n, self.channels)
        return self._drawn[..., :samples]


class _BandStats:
    """Running count, sum and sum of squares per band of two signals (diffused, codec), float64."""

    def __init__(self, n_bands: int):
        self.sums = np.zeros((2, 3, n_bands), np.float64)

    def add(self, diffused_bands: np.ndarray, codec_bands: np.ndarray) -> None:
        for i, bands in enumerate((diffused_bands, codec_bands)):
            flat = bands.reshape(bands.shape[0], -1).astype(np.float64)
            self.sums[i] += [np.full(flat.shape[0], flat.shape[1]), flat.sum(1), np.square(flat).sum(1)]

    def gains(self) -> np.ndarray:
        """Codec over diffused standard deviation (unbiased) per band."""
        n, total, squares = self.sums[:, 0], self.sums[:, 1], self.sums[:, 2]
        var = np.clip(squares - total * total / n, 0, None) / (n - 1)
        return np.sqrt(var[1] / var[0])


class DiffusionStream:
    """One chunk's diffusion decoding as its frames arrive: :meth:`push` the new frames' latent and codec
    decoding, get back the samples that became final; :meth:`finish` at the chunk's end returns the rest.
    The joined output has the whole decode's length (frames * hop).

    ``noises``: the row's noise, (draws, channels, samples >= the chunk's samples), or a :class:`RowNoise`
    that draws it as the chunk grows."""

    def __init__(self, diffusion: MultiBandDiffusion, noises, settings: WindowSettings, hop: int):
        self.diffusion, self.settings, self.hop = diffusion, settings, hop
        if isinstance(noises, RowNoise):
            self._noise, self._noise_limit, channels = noises, None, noises.channels
        else:
            given = np.asarray(noises, np.float32)
            if given.ndim != 3 or given.shape[0] != diffusion.noise_count():
                raise ValueError(f"noises must be (draws={diffusion.noise_count()}, channels, samples), "
                                 f"not {given.shape}")
            self._noise, self._noise_limit, channels = (lambda n: given[..., :n]), given.shape[-1], given.shape[1]
        self._latent: Optional[np.ndarray] = None  # (D, frames so far)
        self._codec = np.zeros((channels, 0), np.float32)  # (channels, samples so far)
        self._next = 0  # index of the next window
        self._tail: Optional[np.ndarray] = None  # the last window's held-back overlap
        self._stats = _BandStats(EQ_BANDS)
        self._finished = False
        self.windows_run = 0

    @property
    def frames(self) -> int:
        return 0 if self._latent is None else self._latent.shape[1]

    def push(self, latent: np.ndarray, wav_codec: np.ndarray) -> np.ndarray:
        """Add frames: ``latent`` (D, n) and their codec decoding ``wav_codec`` (channels, n * hop). Returns the
        samples that became final, (channels, m) (m may be 0)."""
        if self._finished:
            raise RuntimeError("push after finish")
        latent = np.asarray(latent, np.float32)
        wav_codec = np.asarray(wav_codec, np.float32)
        if wav_codec.shape != (self._codec.shape[0], latent.shape[1] * self.hop):
            raise ValueError(f"codec decoding {wav_codec.shape} does not match {latent.shape[1]} frames")
        self._latent = latent if self._latent is None else np.concatenate([self._latent, latent], axis=1)
        self._codec = np.concatenate([self._codec, wav_codec], axis=1)
        if self._noise_limit is not None and self.frames * self.hop > self._noise_limit:
            raise ValueError(f"{self.frames} frames need more noise than the {self._noise_limit} samples given")
        s = self.settings
        out = []
        while s.overlap + (self._next + 1) * s.window + s.lookahead <= self.frames:
            out.append(self._run_window(last=False))
        return self._joined(out)

    def finish(self) -> np.ndarray:
        """The rest of the chunk, (channels, m), once no more frames will come."""
        if self._finished:
            raise RuntimeError("finish called twice")
        self._finished = True
        out = []
        while self._boundary(self._next) < self.frames:
            out.append(self._run_window(last=self._boundary(self._next + 1) >= self.frames))
        if self._tail is not None:  # the previous window ended exactly at the chunk's end
            out.append(self._tail)
            self._tail = None
        return self._joined(out)

    def _joined(self, pieces: list) -> np.ndarray:
        return np.concatenate(pieces, axis=1) if pieces else np.zeros((self._codec.shape[0], 0), np.float32)

    def _boundary(self, k: int) -> int:
        """First frame of window k's core."""
        return 0 if k == 0 else self.settings.overlap + k * self.settings.window

    def _run_window(self, last: bool) -> np.ndarray:
        s, hop, frames = self.settings, self.hop, self.frames
        c0 = self._boundary(self._next)
        c1 = min(self._boundary(self._next + 1), frames)
        fade = s.overlap if self._next > 0 else 0
        stop = min(frames, c1 + s.lookahead)
        start = max(0, min(c0 - fade, stop - s.span))
        self._next += 1
        self.windows_run += 1

        latent = self._latent[None, :, start:stop]
        noises = self._noise(stop * hop)[:, None, :, start * hop :]
        diffused = self.diffusion.generate(latent, (1,) + noises.shape[2:], noises=noises)[0]
        codec = self._codec[:, start * hop : stop * hop]
        if s.eq == "window":
            diffused = re_eq(diffused, codec, self.diffusion.sample_rate)
        elif s.eq == "running":
            rate = self.diffusion.sample_rate
            bands = split_bands(diffused, rate, EQ_BANDS).astype(np.float64)
            codec_bands = split_bands(codec, rate, EQ_BANDS)
            core = slice((c0 - start) * hop, (c1 - start) * hop)
            self._stats.add(bands[..., core], codec_bands[..., core])
            gains = self._stats.gains().reshape((-1,) + (1,) * diffused.ndim)
            diffused = (bands * gains).sum(axis=0).astype(np.float32)

        local = lambda f: (f - start) * hop
        out = []
        if fade:
            join = equal_power_fade if s.fade == "power" else amplitude_fade
            out.append(join(self._tail, diffused[:, local(c0 - fade) : local(c0)]))
        keep = c1 if last else c1 - s.overlap
        out.append(diffused[:, local(c0) : local(keep)])
        self._tail = None if last or not s.overlap else diffused[:, local(keep) : local(c1)]
        return self._joined(out)


def decode_windowed(diffusion: MultiBandDiffusion, latent: np.ndarray, wav_codec: np.ndarray, noises: np.ndarray,
                    settings: WindowSettings, hop: int, frames_per_push: Optional[int] = None) -> np.ndarray:
    """A whole chunk (latent (D, F), codec decoding (channels, F * hop)) through a :class:`DiffusionStream`,
    ``frames_per_push`` frames at a time (all at once by default; the result does not depend on it)."""
    stream = DiffusionStream(diffusion, noises, settings, hop)
    frames = latent.shape[1]
    step = frames_per_push or max(frames, 1)
    pieces = [stream.push(latent[:, i : i + step], wav_codec[:, i * hop : (i + step) * hop])
              for i in range(0, frames, step)]
    pieces.append(stream.finish())
    return np.concatenate(pieces, axis=1)


def decode_whole(diffusion: MultiBandDiffusion, latent: np.ndarray, wav_codec: np.ndarray, noises: np.ndarray,
                 hop: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole-chunk decode the windows approximate: (diffused sum, re-EQ'd), each (channels, F * hop)."""
    samples = latent.shape[1] * hop
    diffused = diffusion.generate(latent[None], (1, wav_codec.shape[0], samples),
                                  noises=np.asarray(noises)[:, None, :, :samples])[0]
    return diffused, re_eq(diffused, wav_codec, diffusion.sample_rate)

