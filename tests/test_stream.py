"""Streaming within a chunk (fixture model, EnCodec decoder): with the lookahead at "whole" a stream
gives exactly the codes of a whole answer; with a short lookahead its first audio comes while the
chunk's first stage still runs, its first-stage codes are unchanged and its audio is as long as the
whole answer's."""

import numpy as np
import pytest

from mvjax.inference.options import StreamSettings

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TEXT = "Hello there, this is a streaming test. And here is a second sentence, longer than the first one."
OPTIONS = dict(seed=3, decoder="encodec", enhance=False, max_new_tokens=120)


def _stream(tts, voice, streaming):
    stream = tts.stream(TEXT, voice, streaming=streaming, **OPTIONS)
    pieces = list(stream)
    chunks = stream.utterance.chunks
    return (stream, np.concatenate(pieces), np.concatenate([c.first_stage_codes for c in chunks], axis=1),
            np.concatenate([c.all_codebooks for c in chunks], axis=1))


@pytest.fixture(scope="module")
def whole(tts, voice):
    return tts.synthesize(TEXT, voice, **OPTIONS)


def test_a_stream_with_whole_lookahead_has_the_whole_answers_codes(tts, voice, whole):
    stream, audio, first, codes = _stream(tts, voice, StreamSettings(frames=8, lookahead=None))
    np.testing.assert_array_equal(first, whole.first_stage_codes)
    np.testing.assert_array_equal(codes, whole.all_codebooks)
    assert stream.sample_rate == whole.sample_rate
    # Same codes, chunk by chunk through the same decoder, one loudness gain: the whole answer's samples
    # up to the float32 rounding of the incremental codec (<= 1e-5 before the gain) and of the gain.
    assert audio.shape == whole.audio.shape
    np.testing.assert_allclose(audio, whole.audio, atol=1e-4)


def test_a_short_lookahead_sends_audio_while_the_first_stage_runs(tts, voice, whole):
    stream, audio, first, codes = _stream(tts, voice, StreamSettings(frames=4, first_frames=2, lookahead=0))
    # The first audio left in an earlier scheduler round than the chunk's last one.
    assert stream.first_audio_steps is not None and stream.first_audio_steps < stream.steps - 1
    np.testing.assert_array_equal(first, whole.first_stage_codes)  # the first stage does not change
    assert codes.shape == whole.all_codebooks.shape
    np.testing.assert_array_equal(codes[:2], whole.all_codebooks[:2])
    assert audio.shape == whole.audio.shape  # as long as the whole answer


def test_stream_settings_are_checked():
    with pytest.raises(ValueError, match="frames"):
        StreamSettings(frames=0)
    with pytest.raises(ValueError, match="lookahead"):
        StreamSettings(lookahead=-1)
    assert StreamSettings(frames=16, first_frames=4).due(0) == 4 and StreamSettings(frames=16, first_frames=4).due(4) == 16
