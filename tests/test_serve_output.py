"""Streamed audio equals the library's whole-signal processing: crossfades, loudness, DeepFilterNet3."""

import numpy as np
import pytest

from mvjax.audio.enhance import DeepFilterNet3, EnhanceStream, enhance
from mvjax.audio.finish import StreamAssembler, crossfade_join, finish_whole
from mvjax.audio.loudness import integrated_loudness, normalize_loudness
from mvjax.serve.output import EnhancerPool

RATE = 24000


def _voice_like(seconds: float, seed: int, level: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    tone = np.sin(2 * np.pi * (140 + 20 * np.sin(2 * np.pi * 0.7 * t)) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return ((tone + 0.05 * rng.standard_normal(t.shape)) * level).astype(np.float32)[None]


def _stream(assembler: StreamAssembler, pieces) -> np.ndarray:
    with assembler:
        out = [assembler.add(p) for p in pieces]
        out.append(assembler.end())
    return np.concatenate(out)


def test_enhance_stream_equals_whole_signal():
    x = _voice_like(2.0, 0)[0]
    whole = enhance(x, RATE, DeepFilterNet3())
    stream = EnhanceStream(RATE, DeepFilterNet3())
    pieces = [stream.process(x[i : i + 7001]) for i in range(0, x.shape[0], 7001)] + [stream.flush()]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


@pytest.mark.parametrize("lengths", [(30000, 5000, 24000), (2000, 900, 40000), (48000,)])
def test_stream_crossfades_equal_the_library_join(lengths):
    pieces = [_voice_like(n / RATE, i) for i, n in enumerate(lengths)]
    streamed = _stream(StreamAssembler(RATE, normalize=False, enhance=False, pool=None), pieces)
    np.testing.assert_array_equal(streamed, crossfade_join(pieces, RATE, 0.05)[0])


def test_one_chunk_stream_equals_whole_answer_enhanced_and_resampled():
    piece = _voice_like(1.5, 3)
    whole = finish_whole([piece], RATE, True, True, EnhancerPool(), RATE)
    streamed = _stream(StreamAssembler(RATE, normalize=True, enhance=True, pool=EnhancerPool(), out_rate=RATE), [piece])
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, atol=1e-6)


def test_stream_loudness_has_no_chunk_to_chunk_jumps():
    """Chunks of equal loudness come out at equal loudness (one gain for the stream), at the target
    level when the first chunk sets it; per-chunk normalisation would also give this, so a quieter
    second chunk checks the gain is shared: it stays quieter by the same amount."""
    loud, quiet = _voice_like(3.0, 4, 0.1), _voice_like(3.0, 5, 0.05)
    streamed = _stream(StreamAssembler(RATE, normalize=True, enhance=False, pool=None), [loud, quiet])
    n = loud.shape[1]
    first, second = streamed[: n - 2000], streamed[n + 2000 :]
    assert abs(integrated_loudness(first, RATE) - integrated_loudness(normalize_loudness(loud, RATE), RATE)) < 0.3
    drop_in = integrated_loudness(loud, RATE) - integrated_loudness(quiet, RATE)
    drop_out = integrated_loudness(first, RATE) - integrated_loudness(second, RATE)
    assert abs(drop_out - drop_in) < 0.5
