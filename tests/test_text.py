"""Normalisation, tokenizers and adapters against the reference fixtures."""

import numpy as np
import pytest

from mvjax.io.checkpoint import load_gpt_stage
from mvjax.text.layout import (
    build_second_stage_input,
    second_stage_codebooks,
    split_first_stage_tokens,
    tilted_decode,
)
from mvjax.text.tokenizer import TextError, TokenizerSpec, normalize_text


def test_normalisation_maps_punctuation_and_folds_whitespace():
    text = "\u201cQuoted\u201d \u2014 it\u2019s\u2026 a\tb\n\nc **bold**  \u00b4x\u00b4   "
    assert normalize_text(text) == "\"Quoted\" - it's... a b c bold 'x'"
    assert normalize_text("\u2016 \u201e \u2025") == "|| ,, .."
    assert normalize_text("caf\u00e9 na\u00efve") == "caf\u00e9 na\u00efve"  # Latin-1 letters pass


def test_non_latin1_text_is_refused_naming_the_character():
    with pytest.raises(TextError) as err:
        normalize_text("Hello \u4e16\u754c and \u20ac")
    msg = str(err.value)
    assert "\u4e16" in msg and "U+4E16" in msg and "U+20AC" in msg and "\n" not in msg


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x0b", "\x1b", "\x7f", "\x85"])
def test_control_characters_are_refused_naming_them(char):
    with pytest.raises(TextError) as err:
        normalize_text(f"Hello{char} there.")
    msg = str(err.value)
    assert f"U+{ord(char):04X}" in msg and "control character" in msg and "\n" not in msg and char not in msg
    assert normalize_text("Hello\tthere.\r\nYes.") == "Hello there. Yes."  # tab, CR, LF stay whitespace


def test_first_stage_tokenizer_matches_fixture_ids(converted, fixtures):
    s1 = np.load(fixtures / "stage1" / "stage1_cases.npz")
    _, _, tok = load_gpt_stage(converted, "first_stage")
    ids = [tok.encode(normalize_text(str(t))) for t in s1["texts"]]
    assert [len(i) for i in ids] == list(s1["tok_lengths"])
    np.testing.assert_array_equal(np.concatenate(ids), s1["tok_ids"])
    assert all(i[-1] == tok.eot_token for i in ids)
    assert tok.decode(ids[0][:-1]) == normalize_text(str(s1["texts"][0]))


def test_tokenizer_spec_json_round_trip(converted, tmp_path):
    spec = TokenizerSpec.from_json_file(converted / "first_stage" / "tokenizer.json")
    (tmp_path / "t.json").write_text(spec.to_json())
    again = TokenizerSpec.from_json_file(tmp_path / "t.json")
    assert again == spec and len(spec.mergeable_ranks) == 512


def test_special_token_text_is_refused(converted):
    _, _, tok = load_gpt_stage(converted, "first_stage")
    with pytest.raises(TextError, match="special token"):
        tok.encode("say <|endoftext|> now")


def test_first_stage_adapter_matches_fixture(fixtures, converted):
    s1 = np.load(fixtures / "stage1" / "stage1_cases.npz")
    _, _, tok = load_gpt_stage(converted, "first_stage")
    codebook_size = (tok.offset - 1) // 2
    for g in ("gen0", "gen1"):
        text, audio = split_first_stage_tokens(s1[f"{g}_seq"], codebook_size)
        np.testing.assert_array_equal(audio, s1[f"{g}_audio_tokens"])
        prompt = [int(t) for t in s1[f"{g}_prompt"]]
        # text = every id above end of audio (prompt, then any text the random model emitted), minus the last
        expect = [int(t) for t in s1[f"{g}_seq"] if t > 2 * codebook_size][:-1]
        assert text == expect and text[: len(prompt) - 1] == prompt[:-1]


def test_second_stage_input_and_adapters_match_fixture(fixtures, converted):
    s2 = np.load(fixtures / "stage2" / "stage2_cases.npz")
    config, _, tok = load_gpt_stage(converted, "second_stage")
    pad = tok.offset - 1
    for b, text in enumerate(s2["texts"]):
        ids = tok.encode(normalize_text(str(text)))
        built = build_second_stage_input(ids, s2[f"row{b}_audio2"], config.block_size, pad)
        np.testing.assert_array_equal(built, s2["input"][b])
        text_ids, audio = tilted_decode(np.concatenate([s2["input"][b], s2["greedy"][b]]), pad)
        np.testing.assert_array_equal(np.asarray(audio), s2[f"row{b}_tilted_audio"])
        np.testing.assert_array_equal(text_ids, s2[f"row{b}_tilted_text_ids"])
        frames = int(s2[f"row{b}_frames"])
        codebooks = second_stage_codebooks(s2["input"][b], s2["greedy"][b], len(ids), frames)
        assert codebooks.shape == (2 + s2["greedy"].shape[1], min(frames, config.block_size - len(ids)))
        np.testing.assert_array_equal(codebooks[:2], s2[f"row{b}_audio2"][:, : codebooks.shape[1]])


def test_pipeline_codebooks_read_at_audio_positions(fixtures, converted):
    """The fixture's all_codebooks are the second stage's predictions at the audio positions."""
    import jax.numpy as jnp

    from mvjax.nn.gpt import forward

    p = np.load(fixtures / "pipeline_cases.npz")
    config, params, tok = load_gpt_stage(converted, "second_stage")
    ids = tok.encode(normalize_text(str(p["text"])))
    assert len(ids) == int(p["stage2_audio_start"])
    x = build_second_stage_input(ids, p["first_stage_tokens"], config.block_size, tok.offset - 1)
    logits = forward(config, params, x[None], jnp.asarray(p["spk_emb"])[None])
    greedy = np.stack([np.asarray(l[0]).argmax(-1) for l in logits])
    got = second_stage_codebooks(x, greedy, len(ids), p["first_stage_tokens"].shape[1])
    np.testing.assert_array_equal(got, p["all_codebooks"])


def test_build_input_cuts_to_block():
    x = build_second_stage_input([900, 901], np.arange(20).reshape(2, 10), block_size=8, pad_token=50)
    assert x.shape == (2, 8)
    np.testing.assert_array_equal(x[0], [900, 901, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(x[1], [50, 50, 10, 11, 12, 13, 14, 15])
