"""The TTS pipeline on the fixture checkpoints: parity, reuse of compiled functions, long-form, batches."""

import logging

import numpy as np
import pytest

from mvjax.audio.finish import crossfade_join
from mvjax.inference.longform import (
    chunk_capacity,
    plan_chunks,
    split_clauses,
    split_in_two,
    split_sentences,
)
from mvjax.inference.pipeline import TTS, SynthesisError

LONG_TEXT = (
    "Long texts are the thing people ask for most. The reference model stops after about thirteen seconds, "
    "so a paragraph has to be split into pieces that each fit the model's context. We cut at sentence ends first; "
    "a sentence that is still too long is cut at its commas, semicolons and colons, and only then between words. "
    "Every piece is spoken with the same voice, and the pieces are joined with short crossfades. "
    "Nothing may be dropped: every word of this paragraph must be in exactly one chunk, in order."
)


def test_tokens_reproduce_pipeline_cases(tts, voice, fixtures):
    p = np.load(fixtures / "pipeline_cases.npz")
    cos = float(voice @ p["spk_emb"] / np.linalg.norm(voice) / np.linalg.norm(p["spk_emb"]))
    assert cos >= 0.9999
    speech = tts.tokens(str(p["text"]), voice, temperature=0.0, stage2_temperature=0.0, guidance_scale=float(p["guidance"]),
                        top_p=float(p["top_p"]), max_new_tokens=int(p["max_new_tokens"]), long_form=False)
    np.testing.assert_array_equal(speech.first_stage_codes, p["first_stage_tokens"])
    np.testing.assert_array_equal(speech.all_codebooks, p["all_codebooks"])
    assert len(speech.chunks) == 1 and speech.chunks[0].prompt_tokens == int(p["stage2_audio_start"])


def test_second_call_in_same_bucket_does_not_recompile(tts, voice):
    kw = dict(seed=1, max_new_tokens=24, decoder="encodec", enhance=False)
    first = tts.synthesize("A first short text.", voice, **kw)
    counts = (tts.first_stage_decoder.compile_count, tts.second_stage_sampler.compile_count)
    second = tts.synthesize("Another short one!", voice, **kw)
    assert (tts.first_stage_decoder.compile_count, tts.second_stage_sampler.compile_count) == counts
    for speech in (first, second):
        assert speech.sample_rate == 24000 and speech.audio.dtype == np.float32
        assert speech.audio.shape == (speech.all_codebooks.shape[1] * 320,)
        assert np.all(np.isfinite(speech.audio))
    # Same seed and text -> same tokens; another seed -> other tokens.
    again = tts.synthesize("A first short text.", voice, **kw)
    np.testing.assert_array_equal(again.all_codebooks, first.all_codebooks)
    other = tts.synthesize("A first short text.", voice, **{**kw, "seed": 2})
    assert not np.array_equal(other.first_stage_codes, first.first_stage_codes)


def test_batch_with_mixed_lengths_and_speakers_equals_single_runs(tts, voice, fixtures):
    other_voice = voice[::-1].copy()
    texts = ["One.", "A rather longer second text, with a clause in it.", "Third text here."]
    speakers = [voice, other_voice, voice]
    kw = dict(seed=5, max_new_tokens=30, temperature=0.8)
    batch = tts.tokens(texts, speakers, **kw)
    for i, (text, spk) in enumerate(zip(texts, speakers)):
        alone = tts.tokens([text], [spk], utterance_ids=[i], **kw)[0]
        np.testing.assert_array_equal(batch[i].first_stage_codes, alone.first_stage_codes)
        np.testing.assert_array_equal(batch[i].all_codebooks, alone.all_codebooks)
    assert not np.array_equal(batch[0].speaker_embedding, batch[1].speaker_embedding)


def test_long_form_chunks_cover_the_text(tts, voice, caplog):
    """A paragraph needing >= 3 chunks gives one waveform; every chunk is present and none hit the block."""
    caplog.set_level(logging.DEBUG, logger="mvjax.chunks")  # the per-chunk lines are DEBUG
    max_new = 40
    speech = tts.synthesize(LONG_TEXT, voice, seed=0, max_new_tokens=max_new, decoder="encodec", enhance=False)
    chunks = speech.chunks
    assert len(chunks) >= 3
    assert " ".join(c.text for c in chunks).split() == speech.text.split()
    for c in chunks:
        assert not c.hit_block_end and not c.stage2_cut
        assert c.prompt_tokens + c.generated_tokens <= tts.config1.block_size
        assert len(tts.tokenizers[1].encode(c.text)) + c.frames + 1 <= tts.config2.block_size
        assert c.frames > 0
    assert sum(c.frames for c in chunks) == speech.all_codebooks.shape[1] == speech.first_stage_codes.shape[1]
    hop, rate = 320, speech.sample_rate
    fade = int(0.05 * rate)
    expected = sum(c.frames * hop for c in chunks)
    assert expected - (len(chunks) - 1) * fade <= speech.audio.shape[0] <= expected
    logged = [r.getMessage() for r in caplog.records if "prompt tokens" in r.getMessage()]
    assert len(logged) >= len(chunks)


def test_chunk_that_fills_the_block_is_split_again(tts, voice):
    """Without a token cap the random fixture model never ends the audio, so a whole sentence fills
    the block: it is re-split (up to the limit) and a chunk of one word that still overflows is reported."""
    with pytest.warns(UserWarning, match="cut short"):
        speech = tts.tokens("Two words.", voice, seed=0, temperature=0.0, stage2_temperature=0.0)
    assert len(speech.chunks) == 2
    assert [c.text for c in speech.chunks] == ["Two", "words."]
    assert all(c.hit_block_end or c.stage2_cut for c in speech.chunks)
    assert speech.truncated


def test_bad_inputs(tts, voice, tmp_path):
    with pytest.raises(SynthesisError, match="empty"):
        tts.tokens("   ", voice)
    with pytest.raises(SynthesisError, match="unsupported character"):
        tts.tokens("Hello \u4e16\u754c", voice)
    with pytest.raises(SynthesisError, match="speaker"):
        tts.tokens("Hello.", None)
    with pytest.raises(SynthesisError, match="shape"):
        tts.tokens("Hello.", np.ones(7, np.float32))
    with pytest.raises(SynthesisError, match="2 speakers for 3 texts"):
        tts.tokens(["a", "b", "c"], [voice, voice])
    with pytest.raises(SynthesisError, match="decoder"):
        tts.synthesize("Hello.", voice, decoder="griffinlim")
    with pytest.raises(SynthesisError, match="NaN"):
        tts.tokens("Hello.", np.full(voice.shape, np.nan, np.float32))


def test_sentence_and_clause_splitting():
    assert split_sentences("Dr. Smith arrived. He sat down! Did he? Yes.") == [
        "Dr. Smith arrived.", "He sat down!", "Did he?", "Yes."]
    assert split_sentences("J. R. R. Tolkien wrote it. The end") == ["J. R. R. Tolkien wrote it.", "The end"]
    assert split_clauses("First, second; third: fourth - fifth") == ["First,", "second;", "third:", "fourth", "- fifth"]
    assert split_in_two("One two. Three four.") == ["One two.", "Three four."]
    assert split_in_two("word") == ["word"]


def test_plan_chunks_packs_sentences_and_keeps_every_word():
    text = "Aa bb cc. Dd ee ff gg hh ii jj kk, ll mm nn. Oo."
    chunks = plan_chunks(text, lambda t: len(t) <= 20)
    assert all(len(c) <= 20 for c in chunks)
    assert " ".join(chunks).split() == text.split()
    assert chunks[0] == "Aa bb cc."
    assert plan_chunks("short", lambda t: len(t) <= 20) == ["short"]


def test_crossfade_join_lengths_and_continuity():
    rate = 1000
    a, b = np.ones((1, 300), np.float32), np.ones((1, 200), np.float32)
    out = crossfade_join([a, b], rate, crossfade_s=0.05)
    assert out.shape == (1, 450)
    # Equal-power fade of two equal constant signals stays within [1, sqrt(2)].
    assert out.min() >= 1.0 - 1e-6 and out.max() <= np.sqrt(2) + 1e-6
    np.testing.assert_array_equal(crossfade_join([a], rate), a)


def test_kth_largest_is_exact_with_ties_and_infinities():
    import jax.numpy as jnp

    from mvjax.inference.sampling import kth_largest

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 300)).astype(np.float32) * 10
    x[1, :50] = -np.inf
    x[2, :] = np.round(x[2, :])  # many ties
    x[3, :] = -np.abs(x[3, :])  # all negative
    for k in (1, 7, 200, 300):
        got = np.asarray(kth_largest(jnp.asarray(x), k))[:, 0]
        np.testing.assert_array_equal(got, -np.sort(-x, axis=-1)[:, k - 1])


def test_inverse_cdf_sampling_matches_the_distribution_and_skips_excluded_ids():
    import jax
    import jax.numpy as jnp

    from mvjax.inference.sampling import sample_inverse_cdf

    logits = jnp.log(jnp.array([0.1, 0.0, 0.3, 0.6, 0.0]))  # ids 1 and 4 excluded (-inf)
    draws = np.asarray(jax.vmap(lambda k: sample_inverse_cdf(k, logits))(jax.random.split(jax.random.PRNGKey(0), 20000)))
    counts = np.bincount(draws, minlength=5) / draws.size
    assert counts[1] == 0 and counts[4] == 0
    np.testing.assert_allclose(counts[[0, 2, 3]], [0.1, 0.3, 0.6], atol=0.015)


ONE_MINUTE = " ".join([
    "The lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father had taught him.",
    "At the top he trimmed the wick, polished the great lens, and watched the first ships turn toward the harbour.",
    "Storms came often in the autumn; the wind rattled the windows, and rain ran in sheets down the white tower.",
    "Some nights he wrote letters to his sister in the city, describing the seals on the rocks and the gulls.",
    "She answered with news of trams and theatres, of crowded markets, of friends who asked when he would visit.",
    "He always meant to go, but the light needed tending, and nobody else on the island knew the old machine.",
    "When the supply boat finally brought a young apprentice, the keeper felt relief and a strange sadness.",
    "He showed the boy everything: the oil, the clockwork, the logbook, and the names of the dangerous reefs.",
    "By spring the apprentice could run the light alone, and the keeper packed a small bag for the mainland.",
    "On the ferry he looked back once, saw the beam sweep across the water, and smiled at the familiar rhythm.",
])


@pytest.fixture(scope="module")
def demo_tts(tmp_path_factory):
    from mvjax.sources.demo import demo_model_dir

    model = TTS.load(demo_model_dir(tmp_path_factory.mktemp("demo_cache")), mesh=None, speaker_cache_dir=None)
    yield model
    model.close()


def test_one_minute_paragraph_at_released_block_sizes(demo_tts):
    """About a minute of speech (~1,100 characters) against the released blocks (2048 / 1024):
    every chunk fits both stages with the budgeted speaking rate, and the whole text is spoken."""
    assert (demo_tts.config1.block_size, demo_tts.config2.block_size) == (2048, 1024)
    chunks = demo_tts.plan(ONE_MINUTE)
    assert 5 <= len(chunks) <= 12
    assert " ".join(chunks).split() == ONE_MINUTE.split()
    for chunk in chunks:
        estimate, capacity = chunk_capacity(chunk, *demo_tts.plan_args)
        assert estimate <= capacity
        assert chunk[-1] in ".;,:"  # cut at sentence or clause ends, never inside a clause


def test_auto_batch_sizes_follow_free_memory(demo_tts):
    from mvjax.inference.throughput import per_utterance_bytes, plan_batch_sizes

    need = per_utterance_bytes(demo_tts, frames=500, decoder="mbd")
    assert all(v > 0 for v in need.values())
    assert per_utterance_bytes(demo_tts, frames=1000, decoder="mbd")["decoder"] > need["decoder"]
    roomy = plan_batch_sizes(demo_tts, frames=500, decoder="mbd", available=10 ** 12)
    biggest = max(need, key=need.get)
    tight = plan_batch_sizes(demo_tts, frames=500, decoder="mbd", available=3 * need[biggest] / 0.7)
    assert roomy == {"stage1": 64, "stage2": 64, "decoder": 64}
    assert tight[biggest] == 2 and all(v >= 2 for v in tight.values())
    voice = np.ones(256, np.float32) / 16
    out = demo_tts.synthesize(["One.", "Two."], voice, max_new_tokens=8, decoder="encodec", enhance=False,
                              batch_size="auto")
    assert len(out) == 2 and set(demo_tts.last_timings) >= {"stage1", "stage2", "codec"}
    with pytest.raises(SynthesisError, match="batch"):
        demo_tts.synthesize("One.", voice, batch_size=0)


def test_stage2_temperature_is_its_own_option(tts, voice, fixtures):
    """The first stage's temperature does not reach the second stage (the reference samples it at 1.0)."""
    p = np.load(fixtures / "pipeline_cases.npz")
    kw = dict(guidance_scale=float(p["guidance"]), top_p=float(p["top_p"]), max_new_tokens=int(p["max_new_tokens"]),
              long_form=False, temperature=0.0)
    default = tts.tokens(str(p["text"]), voice, **kw)
    greedy = tts.tokens(str(p["text"]), voice, stage2_temperature=0.0, **kw)
    np.testing.assert_array_equal(default.first_stage_codes, p["first_stage_tokens"])
    np.testing.assert_array_equal(greedy.all_codebooks, p["all_codebooks"])
    assert (default.all_codebooks[2:] != p["all_codebooks"][2:]).mean() > 0.05  # sampled at 1.0 (~20 % differ), not greedy
    with pytest.raises(SynthesisError, match="stage2_temperature"):
        tts.tokens("Hi.", voice, stage2_temperature=float("nan"))


def test_tts_applies_the_matmul_policy(tts, full_model, monkeypatch):
    """TTS sets the policy the parity tool certifies (highest), or the one asked for."""
    import jax

    from mvjax.core.precision import DEFAULT_POLICY, PrecisionError, apply, resolve
    from mvjax.io.checkpoint import load_gpt_stage

    assert DEFAULT_POLICY == "highest" and tts.matmul_precision == "highest"
    assert jax.config.jax_default_matmul_precision == "highest"
    try:
        monkeypatch.setenv("MVJAX_MATMUL_PRECISION", "high")
        assert resolve() == "high" and resolve("default") == "default"
        model = TTS(load_gpt_stage(full_model, "first_stage"), load_gpt_stage(full_model, "second_stage"))
        assert model.matmul_precision == "high" and jax.config.jax_default_matmul_precision == "high"
        monkeypatch.setenv("MVJAX_MATMUL_PRECISION", "fastest")
        with pytest.raises(PrecisionError, match="MVJAX_MATMUL_PRECISION"):
            resolve()
    finally:
        monkeypatch.delenv("MVJAX_MATMUL_PRECISION")
        apply()
    assert jax.config.jax_default_matmul_precision == "highest"
