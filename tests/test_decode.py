"""The first-stage decoder: loop logic with fake logits, and the real model on the fixture."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvjax.inference.decode import (
    BlockFullWarning,
    FirstStageDecoder,
    decode_loop,
)
from mvjax.inference.keys import utterance_keys
from mvjax.inference.options import SamplingConfig
from mvjax.inference.sampling import (
    filter_logits,
    guide,
    sample,
    top_k_filter,
    top_k_top_p_filter,
    top_p_filter,
)
from mvjax.io.checkpoint import load_gpt_stage

VOCAB = 50
EOA = 40


def _run_fake(logits_fn, prompts, limits, block=64, windows=(16, 32, 64), return_logits=False, sampling=None):
    lens = np.array([len(p) for p in prompts], np.int32)
    plen = 16
    padded = np.zeros((len(prompts), plen), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    sampling = sampling or {"guidance": jnp.float32(1.0), "temperature": jnp.float32(0.0),
                            "top_k": jnp.int32(VOCAB), "top_p": jnp.float32(1.0)}

    @jax.jit
    def run(padded, lens, limits, keys):
        cache = [jnp.zeros((2 * len(prompts), windows[0], 1, 1))]
        state = decode_loop(logits_fn, cache, padded, lens, limits, keys, sampling, block_size=block,
                            windows=windows, end_of_audio=EOA, return_logits=return_logits)
        return state.tokens, state.lengths, state.finished

    tokens, lengths, finished = run(padded, lens, jnp.asarray(limits, jnp.int32), utterance_keys(0, len(prompts)))
    return [np.asarray(tokens)[i, : int(lengths[i])] for i in range(len(prompts))], np.asarray(finished)


def _successor(cache, tokens, positions, window):
    """Fake model: the next token is (current + 1) mod VOCAB, whatever the position."""
    logits = jax.nn.one_hot((tokens + 1) % VOCAB, VOCAB) * 10.0
    return logits, [jax.tree_util.tree_map(lambda c: c + 0, c) for c in cache]


def test_fake_logits_exact_sequence_and_end_of_audio():
    seqs, finished = _run_fake(_successor, [[30, 35], [1, 2, 3]], limits=[64, 20])
    # Row 0 counts up to end of audio (40) and stops right after emitting it.
    np.testing.assert_array_equal(seqs[0], [30, 35, 36, 37, 38, 39, 40])
    # Row 1 never reaches 40 before its limit of 20 tokens.
    np.testing.assert_array_equal(seqs[1], np.arange(1, 21))
    assert finished.tolist() == [True, False]


def test_rows_use_their_own_positions():
    def position_echo(cache, tokens, positions, window):
        # Emits the position of the *next* token, so every row must count from its own length.
        return jax.nn.one_hot(positions + 1, VOCAB) * 10.0, cache

    seqs, _ = _run_fake(position_echo, [[7], [7, 7, 7, 7, 7]], limits=[12, 12])
    np.testing.assert_array_equal(seqs[0], [7] + list(range(1, 12)))
    np.testing.assert_array_equal(seqs[1], [7] * 5 + list(range(5, 12)))


def test_guidance_mixes_cond_and_uncond_rows():
    def split(cache, tokens, positions, window):
        batch = tokens.shape[0] // 2
        cond = jax.nn.one_hot(jnp.full(tokens.shape, 5), VOCAB) * 1.0
        uncond = jax.nn.one_hot(jnp.full(tokens.shape, 6), VOCAB) * 2.0
        return jnp.concatenate([cond[:batch], uncond[batch:]]), cache

    base = {"temperature": jnp.float32(0.0), "top_k": jnp.int32(VOCAB), "top_p": jnp.float32(1.0)}
    # g = 3: token 5 gets 3, token 6 gets -4 -> 5. g = 0: only the unconditioned row -> 6.
    seqs, _ = _run_fake(split, [[1]], limits=[3], sampling={**base, "guidance": jnp.float32(3.0)})
    assert seqs[0].tolist() == [1, 5, 5]
    seqs, _ = _run_fake(split, [[1]], limits=[3], sampling={**base, "guidance": jnp.float32(0.0)})
    assert seqs[0].tolist() == [1, 6, 6]


def _reference_top_p(logits, p):
    """NumPy statement of the reference rule: ascending sort, drop cumulative <= 1 - p, keep the top."""
    order = np.argsort(logits, kind="stable")
    probs = np.exp(logits[order] - logits.max())
    cumulative = np.cumsum(probs / probs.sum())
    remove = cumulative <= 1 - p
    remove[-1] = False
    out = logits.copy()
    out[order[remove]] = -np.inf
    return out


def test_top_p_matches_reference_rule():
    rng = np.random.default_rng(0)
    for p in (0.95, 0.5, 0.1, 1.0):
        logits = rng.standard_normal(300).astype(np.float32) * 3
        np.testing.assert_array_equal(np.asarray(top_p_filter(jnp.asarray(logits), p)), _reference_top_p(logits, p))
    # A dominant token survives alone at small p.
    logits = np.array([0.0, 10.0, 1.0], np.float32)
    assert np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), 0.5))).tolist() == [False, True, False]


def test_one_sort_filter_equals_top_k_then_top_p():
    """The decoder's one-sort top-k + top-p filter gives exactly the two filters in sequence,
    ties (rounded logits), k past the vocabulary and p = 1 included (60 rows per vocabulary size)."""
    rng = np.random.default_rng(3)
    two_filters = jax.jit(lambda x, k, p: top_p_filter(top_k_filter(x, k), p))
    one_sort = jax.jit(top_k_top_p_filter)
    for vocab in (2, 7, 300):
        logits = rng.normal(size=(60, vocab)).astype(np.float32) * rng.uniform(0.1, 10, size=(60, 1))
        logits[::3] = np.round(logits[::3])
        k = rng.integers(1, vocab + 3, size=(60, 1))
        p = rng.uniform(0, 1, size=(60, 1)).astype(np.float32)
        p[::5] = 1.0
        args = (jnp.asarray(logits, jnp.float32), jnp.asarray(k), jnp.asarray(p))
        np.testing.assert_array_equal(np.asarray(one_sort(*args)), np.asarray(two_filters(*args)))


def test_top_k_temperature_and_greedy():
    logits = jnp.asarray([1.0, 4.0, 3.0, 2.0, 4.0])
    kept = np.isfinite(np.asarray(top_k_filter(logits, 2)))
    assert kept.tolist() == [False, True, False, False, True]  # ties with the k-th value are kept
    np.testing.assert_allclose(np.asarray(filter_logits(logits, 0.5)), np.asarray(logits) * 2)
    assert int(sample(jax.random.PRNGKey(0), jnp.asarray([0.0, 3.0, 1.0]), 0.0)) == 1
    np.testing.assert_allclose(np.asarray(guide(jnp.ones(3), jnp.zeros(3), 3.0)), [3.0, 3.0, 3.0])
    # With top-k = 1 any temperature gives the argmax.
    for seed in range(5):
        assert int(sample(jax.random.PRNGKey(seed), jnp.asarray([0.0, 3.0, 2.9]), 1.0, top_k=1)) == 1


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05]))
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    draws = np.asarray(jax.vmap(lambda k: sample(k, logits, 1.0, top_p=0.7))(keys))
    # top-p 0.7 drops tokens with ascending cumulative <= 0.3 -> the 0.05 and 0.15 tokens go.
    assert set(np.unique(draws)) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03


@pytest.fixture(scope="module")
def decoder(converted):
    config, params, tok = load_gpt_stage(converted, "first_stage")
    return FirstStageDecoder(config, params, end_of_audio=tok.offset - 1), tok


def _prompts(tok, texts):
    return [tok.encode(t) for t in texts]


def test_compile_count_stays_one_within_a_bucket(decoder):
    dec, tok = decoder
    before = dec.compile_count
    spk = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    for i, text in enumerate(["Hi.", "Hello there, friend.", "A slightly longer line"]):
        prompt = tok.encode(text)
        assert len(prompt) <= 16
        sampling = SamplingConfig(guidance_scale=2.0 + i, temperature=0.5 * i, top_p=0.9)
        dec.generate([prompt], spk, utterance_keys(i, 1), sampling, max_new_tokens=5 + i)
    assert dec.compile_count - before == 1


def test_batch_equals_singles_with_sampling(decoder):
    dec, tok = decoder
    prompts = _prompts(tok, ["One.", "Two words here, please.", "And a third, somewhat longer prompt for the batch!"])
    spk = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    keys = utterance_keys(7, 3)
    sampling = SamplingConfig(temperature=1.0, top_p=0.95)
    batch = dec.generate(prompts, spk, keys, sampling, max_new_tokens=40)
    for i, prompt in enumerate(prompts):
        single = dec.generate([prompt], spk[i : i + 1], keys[i : i + 1], sampling, max_new_tokens=40)
        np.testing.assert_array_equal(batch.sequences[i], single.sequences[0])


def test_seed_reproduces_and_different_seeds_differ(decoder):
    dec, tok = decoder
    prompt = tok.encode("Seeds matter.")
    spk = np.random.default_rng(2).standard_normal((1, 256)).astype(np.float32)
    sampling = SamplingConfig(temperature=1.0, top_p=0.95)
    a = dec.generate([prompt], spk, utterance_keys(11, 1), sampling, max_new_tokens=30).sequences[0]
    b = dec.generate([prompt], spk, utterance_keys(11, 1), sampling, max_new_tokens=30).sequences[0]
    c = dec.generate([prompt], spk, utterance_keys(12, 1), sampling, max_new_tokens=30).sequences[0]
    np.testing.assert_array_equal(a, b)
    assert len(a) != len(c) or not np.array_equal(a, c)


def test_running_out_of_block_is_reported(converted):
    config, params, tok = load_gpt_stage(converted, "first_stage")
    # An end-of-audio id the model can never emit forces the loop to the end of the block.
    dec = FirstStageDecoder(config, params, end_of_audio=config.vocab_sizes[0] + 5)
    prompt = tok.encode("Never ends.")
    with pytest.warns(BlockFullWarning, match="block"):
        result = dec.generate([prompt], None, utterance_keys(0, 1), SamplingConfig(temperature=0.0))
    assert result.truncated and result.hit_block_end.tolist() == [True] and not result.finished[0]
    assert len(result.sequences[0]) == config.block_size


def test_end_of_audio_stops_a_row(decoder):
    dec, tok = decoder
    # Sample freely until some row emits end of audio; the sequence must end right there.
    prompts = _prompts(tok, ["Stop when done."] * 4)
    result = dec.generate(prompts, None, utterance_keys(3, 4), SamplingConfig(guidance_scale=1.0, temperature=3.0, top_p=None),
                          max_new_tokens=200)
    for seq, fin in zip(result.sequences, result.finished):
        hits = np.flatnonzero(seq[len(prompts[0]):] == dec.end_of_audio)
        if fin:
            assert len(hits) == 1 and seq[-1] == dec.end_of_audio
        else:
            assert len(hits) == 0
    assert result.finished.any(), "no row produced end of audio at temperature 3 in 200 steps"


def test_bad_arguments(decoder):
    dec, tok = decoder
    with pytest.raises(ValueError, match="key"):
        dec.generate([[1, 2]], None, utterance_keys(0, 2))
    with pytest.raises(ValueError, match="block"):
        dec.generate([[1] * dec.config.block_size], None, utterance_keys(0, 1))
