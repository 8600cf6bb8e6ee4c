"""Fine-tuning data: row building (against the reference fixture), listings, the data format, and
``python -m mvjax.finetune prepare`` end to end on the random demo model (bad rows, cache reuse,
argument errors)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mvjax.cli.finetune import main
from mvjax.text.tokenizer import normalize_text
from mvjax.train import data as ftdata
from mvjax.train.data import (
    DataError,
    ListingError,
    MissingSplitError,
    build_row,
    fits,
    load_split,
    read_listing,
)

sf = pytest.importorskip("soundfile")


# --- Rows ---------------------------------------------------------------------------------


def test_fixture_rows_rebuild_exactly(fixtures, converted):
    from mvjax.io.checkpoint import load_gpt_stage

    _, _, tok = load_gpt_stage(converted, "first_stage")
    cases = np.load(fixtures / "finetune" / "finetune_cases.npz")
    ctx, pad = int(cases["ctx_window"]), int(cases["pad_token"])
    assert pad == tok.offset - 1
    cut = 0
    for i, text in enumerate(cases["texts"]):
        ids = tok.encode(normalize_text(str(text)))
        row = build_row(ids, cases[f"codes_{i}"], ctx, pad, (tok.offset - 1) // 2)
        assert row.shape == (1, ctx + 1) and row.dtype == np.int32
        np.testing.assert_array_equal(row, cases["tokens"][i])
        cut += not fits(len(ids), cases[f"codes_{i}"].shape[1], ctx)
    assert cut >= 1  # the fixture holds a row the reference truncates


def test_build_row_layout_padding_and_truncation():
    codes = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    row = build_row([20, 21], codes, ctx_window=10, pad_token=16, codebook_size=8)
    assert row.tolist() == [[20, 21, 1, 12, 2, 13, 3, 14, 16, 16, 16]]
    assert build_row([20, 21], codes, ctx_window=4, pad_token=16, codebook_size=8).tolist() == [[20, 21, 1, 12, 2]]
    assert fits(2, 3, 8) and not fits(2, 3, 7)  # 2 + 6 + end of audio must fit in ctx + 1
    for bad in (np.array([[8], [0]]), np.array([[0], [-1]]), np.zeros((1, 3), int), np.zeros((2, 2), float)):
        with pytest.raises(DataError):
            build_row([20], bad, ctx_window=10, pad_token=16, codebook_size=8)


# --- Listings -----------------------------------------------------------------------------


def test_csv_listing_paths_captions_and_malformed_rows(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cap.txt").write_text("  From a file.\n")
    (tmp_path / "sub" / "a.wav").write_bytes(b"")
    (tmp_path / "list.csv").write_text(
        'audio_files|captions\nsub/a.wav|sub/cap.txt\nsub/a.wav|"Quoted | with a bar"\n\n'
        "sub/a.wav|notes.txt\nsub/a.wav|Read notes.txt aloud.\nsub/a.wav\nnope.wav|Hi.\n"
    )
    entries = read_listing(tmp_path / "list.csv")
    assert [e.where for e in entries] == [f"list.csv line {n}" for n in (2, 3, 5, 6, 7, 8)]
    first, quoted, missing_txt, sentence, short, no_audio = entries
    assert first.text == "From a file." and first.caption_file == tmp_path / "sub" / "cap.txt"
    assert first.audio == tmp_path / "sub" / "a.wav" and first.problem is None
    assert quoted.text == "Quoted | with a bar" and quoted.caption_file is None
    assert missing_txt.problem[0] == "missing caption file"
    assert sentence.text == "Read notes.txt aloud." and sentence.problem is None
    assert short.problem[0] == "malformed row" and no_audio.problem[0] == "missing audio"


def test_jsonl_listing(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    lines = [json.dumps({"audio": "a.wav", "text": "One."}), "{broken", "[1, 2]", json.dumps({"audio": "a.wav"}), ""]
    (tmp_path / "l.jsonl").write_text("\n".join(lines))
    entries = read_listing(tmp_path / "l.jsonl")
    assert entries[0].text == "One." and entries[0].problem is None
    assert [e.problem[0] for e in entries[1:]] == ["malformed row"] * 3


def test_listing_errors(tmp_path):
    with pytest.raises(ListingError, match="not found"):
        read_listing(tmp_path / "none.csv")
    (tmp_path / "x.tsv").write_text("a")
    with pytest.raises(ListingError, match=".csv or a .jsonl"):
        read_listing(tmp_path / "x.tsv")
    (tmp_path / "h.csv").write_text("audio,text\na.wav,Hi\n")
    with pytest.raises(ListingError, match="header"):
        read_listing(tmp_path / "h.csv")


def test_empty_and_header_only_listings_say_so(demo_model, tmp_path, capsys):
    """An empty file is 'empty', a header alone 'has no rows': not a header 'got None', nor 'see the reasons above'."""
    for name, content, needle in (("e.csv", "", "the listing is empty"), ("e.jsonl", "\n \n", "the listing is empty"),
                                  ("h.csv", "audio_files|captions\n\n", "the listing has no rows (only the header)")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ListingError) as info:
            read_listing(tmp_path / name)
        assert str(info.value) == f"{tmp_path / name}: {needle}"
        rc = main(["prepare", "--model", str(demo_model), "--train", str(tmp_path / name),
                   "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and needle in err[0] and "above" not in err[0] and "None" not in err[0], err
    assert not (tmp_path / "o").exists()


def test_only_containers_libsndfile_cannot_read_get_the_install_hint(tmp_path, monkeypatch):
    """Without ffmpeg, a text file given as audio is unreadable audio; an .m4a needs ffmpeg; a cut .flac is damaged."""
    from mvjax.audio import io as audio_io

    monkeypatch.setattr(audio_io.shutil, "which", lambda name: None)  # as on a machine without ffmpeg
    text = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    for name in ("passwd", "notes.txt", "clip.bin"):
        (tmp_path / name).write_text(text)
        with pytest.raises(audio_io.AudioError, match="not a readable audio file") as info:
            audio_io.load_audio(tmp_path / name)
        assert "ffmpeg" not in str(info.value) and len(str(info.value).splitlines()) == 1
    (tmp_path / "v.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + bytes(64))
    with pytest.raises(audio_io.AudioError, match="M4A files need ffmpeg, which is not installed"):
        audio_io.load_audio(tmp_path / "v.m4a")
    sf.write(tmp_path / "v.flac", _voice(16000, 16000), 16000)
    (tmp_path / "cut.flac").write_bytes((tmp_path / "v.flac").read_bytes()[:40])
    with pytest.raises(audio_io.AudioError, match="not a valid FLAC file") as info:
        audio_io.load_audio(tmp_path / "cut.flac")
    assert "ffmpeg" not in str(info.value)


# --- End to end on the demo model ---------------------------------------------------------


def _voice(n: int, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * 190 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(n)
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Listings with good and bad rows, clips at several rates and channel counts."""
    root = tmp_path_factory.mktemp("dataset")
    clips = root / "clips"
    clips.mkdir()
    sf.write(clips / "stereo.wav", _voice(11025, 22050, channels=2), 22050)  # resampled, then mono
    sf.write(clips / "b.flac", _voice(8000, 16000, seed=1), 16000)  # 0.5 s: --min-seconds' default
    sf.write(clips / "c.wav", _voice(12000, 24000, seed=2), 24000)
    sf.write(clips / "silent.wav", np.zeros(8000, np.float32), 16000)
    sf.write(clips / "long.wav", _voice(36000, 24000, seed=3), 24000)  # 113 frames: too long for ctx 128
    (clips / "garbage.wav").write_bytes(b"RIFF0000WAVEnot really audio" * 10)
    (clips / "b.txt").write_text("A caption read from a file.\n")
    (root / "train.csv").write_text(
        "audio_files|captions\n"
        "clips/stereo.wav|Hello there, a stereo clip.\n"
        "clips/b.flac|clips/b.txt\n"
        "clips/missing.wav|Gone.\n"
        "clips/c.wav|   \n"
        "clips/silent.wav|Quiet please.\n"
        "clips/long.wav|This one is too long.\n"
        "clips/c.wav|clips/nope.txt\n"
        "clips/garbage.wav|Broken file.\n"
    )
    (root / "val.jsonl").write_text(json.dumps({"audio": "clips/c.wav", "text": "Validation clip."}) + "\n{bad\n")
    return root


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from mvjax.sources.demo import demo_model_dir

    return demo_model_dir(tmp_path_factory.mktemp("demo_cache"))


@pytest.fixture(scope="module")
def finetune_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ft_cache")


def _prepare(model, dataset, out, cache, monkeypatch, *extra):
    monkeypatch.setenv("MVJAX_CACHE", str(cache))
    return main(["prepare", "--model", str(model), "--train", str(dataset / "train.csv"),
                 "--val", str(dataset / "val.jsonl"), "--out", str(out), "--ctx-window", "128", *extra])


@pytest.fixture(scope="module")
def prepared(demo_model, dataset, finetune_cache, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("prepared") / "DATA"
    try:
        assert _prepare(demo_model, dataset, out, finetune_cache, mp) == 0
    finally:
        mp.undo()
    return out


def test_prepare_writes_the_documented_format(prepared, demo_model, dataset):
    from mvjax.io.checkpoint import load_gpt_stage, read_manifest

    manifest = json.loads((prepared / "manifest.json").read_text())
    comps = read_manifest(demo_model)["components"]
    _, _, tok = load_gpt_stage(demo_model, "first_stage")
    assert manifest["format"] == "mvjax-finetune-data" and manifest["version"] == 1
    assert manifest["model"] == str(demo_model.absolute())
    for name in ("first_stage", "encodec", "speaker_encoder"):
        assert manifest[f"{name}_sha256"] == comps[name]["params_sha256"]
    assert (manifest["ctx_window"], manifest["pad_token"], manifest["codebook_size"], manifest["speaker_emb_dim"]) == (
        128, tok.offset - 1, (tok.offset - 1) // 2, 256)
    assert manifest["splits"] == {
        "train": {"rows": 2, "skipped": {"empty text": 1, "missing audio": 1, "missing caption file": 1,
                                         "silent": 1, "too long": 1, "unreadable audio": 1}},
        "val": {"rows": 1, "skipped": {"malformed row": 1}},
    }
    train = load_split(prepared, "train")
    assert train.tokens.shape == (2, 1, 129) and train.tokens.dtype == np.int32
    assert train.spk.shape == (2, 256) and train.spk.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(train.spk, axis=1), 1.0, atol=1e-5)
    assert train.texts.tolist() == ["Hello there, a stereo clip.", "A caption read from a file."]
    assert train.audio.tolist() == [str(dataset / "clips" / "stereo.wav"), str(dataset / "clips" / "b.flac")]
    assert train.frames.tolist() == [38, 38]  # ceil(12000 / 320) at 24 kHz, both
    for row, text, frames in zip(train.tokens[:, 0], train.texts, train.frames):
        ids = tok.encode(normalize_text(str(text)))
        assert row[: len(ids)].tolist() == ids
        audio = row[len(ids): len(ids) + 2 * frames]
        assert (audio[0::2] < 1024).all() and ((audio[1::2] >= 1024) & (audio[1::2] < 2048)).all()
        assert (row[len(ids) + 2 * frames:] == 2048).all()
    from mvjax.core.atomic import current_umask

    assert prepared.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # not mkdtemp's 0o700


def test_prepare_codes_match_the_codec_on_a_24khz_clip(prepared, demo_model, dataset):
    import jax

    from mvjax.io.checkpoint import load_encodec
    from mvjax.nn.encodec import encode_wav

    val = load_split(prepared, "val")
    cfg, params = load_encodec(demo_model)
    wav, _ = sf.read(dataset / "clips" / "c.wav", dtype="float32")
    codes = np.asarray(jax.jit(lambda p, w: encode_wav(cfg, p, w, 6.0))(params, wav[None, None]))[0]
    expected = build_row(_text_ids(demo_model, "Validation clip."), codes, 128, 2048, 1024)
    np.testing.assert_array_equal(val.tokens[0], expected)


def _text_ids(model, text):
    from mvjax.io.checkpoint import load_gpt_stage

    return load_gpt_stage(model, "first_stage")[2].encode(normalize_text(text))


def test_prepare_again_reuses_the_cache(prepared, demo_model, dataset, finetune_cache, tmp_path, monkeypatch, capsys):
    from mvjax.inference.speaker import SpeakerEncoder
    from mvjax.nn import encodec

    cached = sorted((finetune_cache / "finetune").rglob("*.npy"))
    assert len(cached) == 6  # codes and embeddings of stereo.wav, b.flac and c.wav, once each
    mtimes = [p.stat().st_mtime_ns for p in cached]

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(encodec, "encode_wav", boom)
    monkeypatch.setattr(SpeakerEncoder, "embed_audio", boom)
    out = tmp_path / "again"
    assert _prepare(demo_model, dataset, out, finetune_cache, monkeypatch) == 0
    assert "EnCodec: 0 clip(s) encoded, 3 from the cache" in capsys.readouterr().err
    assert sorted((finetune_cache / "finetune").rglob("*.npy")) == cached
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    for split in ("train", "val"):
        a, b = load_split(prepared, split), load_split(out, split)
        for name in ftdata.ARRAYS:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_truncate_long_keeps_long_clips_cut(demo_model, dataset, finetune_cache, tmp_path, monkeypatch):
    out = tmp_path / "cut"
    assert _prepare(demo_model, dataset, out, finetune_cache, monkeypatch, "--truncate-long", "--quiet") == 0
    train = load_split(out, "train")
    assert train.manifest["splits"]["train"]["rows"] == 3 and train.manifest["splits"]["train"]["truncated"] == 1
    assert "too long" not in train.manifest["splits"]["train"]["skipped"]
    assert train.frames[2] == 113 and (train.tokens[2, 0] != 2048).all()  # cut: no end of audio


def _one_line(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err and err[-1].startswith("error: ")
    return err[-1]


def test_argument_errors(demo_model, dataset, finetune_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MVJAX_CACHE", str(finetune_cache))
    base = ["prepare", "--model", str(demo_model), "--out", str(tmp_path / "o")]
    assert "not found" in _one_line(capsys, main(base + ["--train", str(tmp_path / "none.csv")]))
    (tmp_path / "bad.csv").write_text("audio|text\n")
    assert "header" in _one_line(capsys, main(base + ["--train", str(tmp_path / "bad.csv")]))
    train = ["--train", str(dataset / "train.csv")]
    assert "even" in _one_line(capsys, main(base + train + ["--ctx-window", "127"]))
    assert "block size" in _one_line(capsys, main(base + train + ["--ctx-window", "4096"]))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert "--overwrite" in _one_line(capsys, main(["prepare", "--model", str(demo_model), "--out", str(busy)] + train))
    assert (busy / "keep.txt").read_text() == "x"
    rc = main(["prepare", "--model", str(demo_model), "--out", str(dataset), "--overwrite"] + train)
    assert "overwrite an input" in _one_line(capsys, rc)
    (tmp_path / "none.csv").write_text("audio_files|captions\nmissing.wav|Hi.\n")
    rc = main(["prepare", "--model", str(demo_model), "--out", str(tmp_path / "empty"),
               "--train", str(tmp_path / "none.csv")])
    assert "no usable clips" in _one_line(capsys, rc)
    assert not (tmp_path / "empty").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".empty")]


# --- Reading damaged data -----------------------------------------------------------------


def _copy(prepared, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    return out


def test_load_split_refuses_damaged_files(prepared, tmp_path):
    out = _copy(prepared, tmp_path)
    with pytest.raises(MissingSplitError) as info:
        load_split(out, "test")
    assert isinstance(info.value, FileNotFoundError)
    (out / "val.npz").unlink()
    with pytest.raises(FileNotFoundError):
        load_split(out, "val")
    good = (out / "train.npz").read_bytes()
    (out / "train.npz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="npz"):
        load_split(out, "train")
    split = load_split(prepared, "train")
    arrays = {n: getattr(split, n) for n in ftdata.ARRAYS}
    for change, message in (
        ({"tokens": arrays["tokens"].astype(np.int64)}, "tokens"),
        ({"spk": arrays["spk"][:, :10]}, "spk"),
        ({"frames": arrays["frames"].astype(np.float32)}, "frames"),
        ({"extra": np.zeros(1)}, "unexpected"),
    ):
        np.savez(out / "train.npz", **{**arrays, **change})
        with pytest.raises(DataError, match=message):
            load_split(out, "train")
    # A member far larger than the manifest's row count allows is refused before it is read.
    np.savez(out / "train.npz", **{**arrays, "tokens": np.zeros((200, 1, 129), np.int32)})
    with pytest.raises(DataError, match="more than 2 rows can hold"):
        load_split(out, "train")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(DataError, match="version"):
        load_split(out, "train")
    os.remove(out / "manifest.json")
    with pytest.raises(DataError, match="manifest"):
        load_split(out, "train")


def test_clips_too_long_for_the_window_are_skipped_from_their_header(demo_model, finetune_cache, tmp_path,
                                                                    monkeypatch):
    """Refused before the samples are read: the header says the clip cannot fit (or exceeds the cap)."""
    from mvjax.train import prepare as prep

    clips = tmp_path / "clips"
    clips.mkdir()
    sf.write(clips / "long.wav", _voice(48000, 16000, seed=4), 16000)  # 3 s = 225 frames > ctx 128
    sf.write(clips / "ok.wav", _voice(8000, 16000, seed=5), 16000)
    (tmp_path / "train.csv").write_text("audio_files|captions\nclips/long.wav|Long.\nclips/ok.wav|Short.\n")
    read = []
    original = prep.ClipCoder.audio
    monkeypatch.setattr(prep.ClipCoder, "audio", lambda self, path: read.append(Path(path).name) or original(self, path))
    monkeypatch.setenv("MVJAX_CACHE", str(tmp_path / "cache"))
    assert main(["prepare", "--model", str(demo_model), "--train", str(tmp_path / "train.csv"),
                 "--out", str(tmp_path / "DATA"), "--ctx-window", "128", "--quiet"]) == 0
    assert read == ["ok.wav"]
    assert load_split(tmp_path / "DATA", "train").manifest["splits"]["train"]["skipped"] == {"too long": 1}
    monkeypatch.setattr(prep, "MAX_CLIP_SECONDS", 0.1)
    monkeypatch.setenv("MVJAX_CACHE", str(tmp_path / "cache2"))  # nothing cached: every clip would be read
    read.clear()
    (tmp_path / "train.csv").write_text("audio_files|captions\nclips/ok.wav|Short.\nclips/ok.wav|Again.\n")
    rc = main(["prepare", "--model", str(demo_model), "--train", str(tmp_path / "train.csv"),
               "--out", str(tmp_path / "DATA2"), "--ctx-window", "128", "--quiet"])
    assert rc == 1 and read == []  # every clip over the cap: nothing read, the split is empty, an error


# --- Clips cut, too short or repeated; SIGTERM; temp directories of killed runs -------------------------------


def _write_cut_wav(path: Path, keep_bytes: int, subtype: str) -> None:
    """A 1 s WAV of which only the first ``keep_bytes`` bytes are kept: its header still promises 1 s."""
    sf.write(path, _voice(16000, 16000, seed=6), 16000, subtype=subtype)
    path.write_bytes(path.read_bytes()[:keep_bytes])


def test_truncated_and_short_clips_are_skipped(demo_model, tmp_path, monkeypatch, capsys):
    from mvjax.audio.io import wav_shortfall

    clips = tmp_path / "clips"
    clips.mkdir()
    sf.write(clips / "whole.wav", _voice(16000, 16000, seed=6), 16000, subtype="FLOAT")  # fact and PEAK chunks too
    _write_cut_wav(clips / "cut.wav", 2000, "PCM_16")  # libsndfile reads 978 samples (4 frames) without a word
    _write_cut_wav(clips / "cut_float.wav", 20000, "FLOAT")
    sf.write(clips / "short.wav", _voice(4800, 16000, seed=7), 16000)  # 0.3 s
    (tmp_path / "train.csv").write_text("audio_files|captions\nclips/whole.wav|Whole.\nclips/cut.wav|Cut.\n"
                                        "clips/cut_float.wav|Cut too.\nclips/short.wav|Short.\n")
    assert wav_shortfall(clips / "whole.wav") is None and wav_shortfall(clips / "short.wav") is None
    assert wav_shortfall(clips / "cut.wav") == (1.0, 1956 / 32000)
    monkeypatch.setenv("MVJAX_CACHE", str(tmp_path / "cache"))
    base = ["prepare", "--model", str(demo_model), "--train", str(tmp_path / "train.csv"), "--ctx-window", "256",
            "--quiet"]
    assert main(base + ["--out", str(tmp_path / "A")]) == 0
    err = capsys.readouterr().err
    assert "train.csv line 3: truncated audio (the WAV header promises 1.00 s of audio, the file holds 0.06 s)" in err
    assert "train.csv line 5: too short (0.30 s of audio, less than --min-seconds 0.5)" in err
    train = load_split(tmp_path / "A", "train")
    assert train.manifest["splits"]["train"]["skipped"] == {"too short": 1, "truncated audio": 2}
    assert train.audio.tolist() == [str(clips / "whole.wav")] and train.frames.tolist() == [75]
    assert main(base + ["--out", str(tmp_path / "B"), "--min-seconds", "0.2"]) == 0
    train = load_split(tmp_path / "B", "train")
    assert train.manifest["splits"]["train"]["skipped"] == {"truncated audio": 2}
    assert train.frames.tolist() == [75, 23]
    capsys.readouterr()
    for bad in ("-1", "nan", "inf"):
        assert "--min-seconds" in _one_line(capsys, main(base + ["--out", str(tmp_path / "C"), "--min-seconds", bad]))
    assert not (tmp_path / "C").exists()


def test_duplicate_rows_are_reported_and_kept_once(demo_model, dataset, finetune_cache, tmp_path, monkeypatch, capsys):
    """Same file content (another name too) and the same normalised text: one row, unless --keep-duplicates."""
    import shutil

    shutil.copy(dataset / "clips" / "c.wav", tmp_path / "copy.wav")
    (tmp_path / "train.csv").write_text(
        "audio_files|captions\n"
        f"{dataset / 'clips' / 'c.wav'}|Hello there.\n"
        f"{dataset / 'clips' / 'c.wav'}|  Hello   there.\n"  # the same after normalisation
        "copy.wav|Hello there.\n"  # the same bytes under another name
        "copy.wav|Hello there!\n"  # another text: another row
    )
    monkeypatch.setenv("MVJAX_CACHE", str(finetune_cache))
    base = ["prepare", "--model", str(demo_model), "--train", str(tmp_path / "train.csv"), "--ctx-window", "128"]
    assert main(base + ["--out", str(tmp_path / "A")]) == 0
    err = capsys.readouterr().err
    assert "train.csv line 3: duplicate (the same audio and text as train.csv line 2)" in err
    assert "train.csv line 4: duplicate (the same audio and text as train.csv line 2)" in err
    assert "train: 2 rows, 2 skipped (2 duplicate)" in err
    train = load_split(tmp_path / "A", "train")
    assert train.manifest["splits"]["train"] == {"rows": 2, "skipped": {"duplicate": 2}}
    assert train.texts.tolist() == ["Hello there.", "Hello there!"]
    assert main(base + ["--out", str(tmp_path / "B"), "--keep-duplicates"]) == 0
    assert "train: 4 rows, 0 skipped, 2 duplicate(s) kept" in capsys.readouterr().err
    train = load_split(tmp_path / "B", "train")
    assert train.manifest["splits"]["train"] == {"rows": 4, "skipped": {}, "duplicates": 2}
    np.testing.assert_array_equal(train.tokens[0], train.tokens[2])


def _temp_dirs(parent: Path, out_name: str) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}.tmp-"))


def test_sigterm_stops_prepare_with_one_line_and_no_leftovers(demo_model, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    clips = tmp_path / "clips"
    clips.mkdir()
    rows = []
    for i in range(10):  # one codec compilation per length: seconds of work to interrupt
        sf.write(clips / f"c{i}.wav", _voice(8000 + 800 * i, 16000, seed=i), 16000)
        rows.append(f"clips/c{i}.wav|Clip number {i}.")
    (tmp_path / "train.csv").write_text("audio_files|captions\n" + "\n".join(rows) + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mvjax.finetune", "prepare", "--model", str(demo_model), "--train",
         str(tmp_path / "train.csv"), "--out", str(tmp_path / "DATA"), "--ctx-window", "256", "--quiet"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "MVJAX_CACHE": str(tmp_path / "cache")},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not _temp_dirs(tmp_path, "DATA"):  # the run has started its work
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "prepare never started"
            time.sleep(0.02)
        assert _temp_dirs(tmp_path, "DATA")[0].startswith(f".DATA.tmp-{proc.pid}.")  # named by its owner
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.strip().splitlines()
    assert proc.returncode == 143, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "SIGTERM" in lines[0], err
    assert _temp_dirs(tmp_path, "DATA") == [] and not (tmp_path / "DATA").exists()


def test_a_run_removes_temp_dirs_of_killed_runs_only(demo_model, dataset, finetune_cache, tmp_path, monkeypatch):
    from mvjax.core.scratch import owner_token
    from tests.test_scratch import _dead_token

    dead = tmp_path / f".DATA.tmp-{_dead_token()}-abc123"
    live = tmp_path / f".DATA.tmp-{owner_token()}-def456"  # this process: a run still going
    other = tmp_path / f".OTHER.tmp-{_dead_token()}-abc123"  # another --out's: not this run's to judge
    for path in (dead, live, other):
        path.mkdir()
        (path / "train.npz").write_bytes(b"partial")
    (tmp_path / "train.csv").write_text(f"audio_files|captions\n{dataset / 'clips' / 'c.wav'}|Hello.\n")
    monkeypatch.setenv("MVJAX_CACHE", str(finetune_cache))
    assert main(["prepare", "--model", str(demo_model), "--train", str(tmp_path / "train.csv"),
                 "--out", str(tmp_path / "DATA"), "--ctx-window", "128", "--quiet"]) == 0
    assert not dead.exists() and (live / "train.npz").is_file() and (other / "train.npz").is_file()
    assert _temp_dirs(tmp_path, "DATA") == [live.name] and load_split(tmp_path / "DATA", "train").tokens.shape[0] == 1
