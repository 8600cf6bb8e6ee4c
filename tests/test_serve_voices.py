"""The speech server's voice registry (mvjax.serve.voices): names, limits, storage, concurrency."""

import hashlib
import io
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mvjax.serve import voices as voices_mod
from mvjax.serve.voices import (
    InvalidVoiceAudio,
    InvalidVoiceName,
    VoiceDurationError,
    VoiceError,
    VoiceExists,
    VoiceLimits,
    VoiceNotFound,
    VoiceProtected,
    VoiceRegistry,
    VoiceStoreFull,
    VoiceTooLarge,
)

DIMS = 8
RATE = 16000


def fake_embed(path: Path) -> np.ndarray:
    """A deterministic unit vector from the file's bytes."""
    seed = int.from_bytes(hashlib.sha256(Path(path).read_bytes()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIMS).astype(np.float32)
    return v / np.linalg.norm(v)


def audio_bytes(seconds: float = 2.0, freq: float = 220.0, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), RATE, format=fmt,
             subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture
def tmpdir_(tmp_path):
    d = tmp_path / "tmp"
    d.mkdir()
    return d


@pytest.fixture
def make(tmp_path, tmpdir_):
    def make(directory="voices", limits=VoiceLimits(), **kw):
        d = None if directory is None else tmp_path / directory
        return VoiceRegistry(d, fake_embed, limits, dims=DIMS, temp_dir=tmpdir_, **kw)
    return make


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_add_get_list_delete(make, tmp_path, tmpdir_):
    reg = make()
    data = audio_bytes()
    v = reg.add("alice", data, "alice.wav")
    assert v.name == "alice" and v.dims == DIMS and v.sha256 == hashlib.sha256(data).hexdigest()
    emb = reg.get("alice")
    assert emb.shape == (DIMS,) and emb.dtype == np.float32
    assert abs(np.linalg.norm(emb) - 1) < 1e-5
    assert [x.name for x in reg.list()] == ["alice"]
    assert files(tmp_path / "voices") == ["alice.npz"]
    with np.load(tmp_path / "voices" / "alice.npz") as npz:
        assert set(npz.files) == {"embedding", "sha256", "created"}
        np.testing.assert_array_equal(npz["embedding"], emb)
        assert str(npz["sha256"]) == v.sha256
    reg.add("bob", audio_bytes(freq=330), "bob.flac")
    assert [x.name for x in reg.list()] == ["alice", "bob"]
    reg.delete("alice")
    assert [x.name for x in reg.list()] == ["bob"]
    assert files(tmp_path / "voices") == ["bob.npz"]
    with pytest.raises(VoiceNotFound) as e:
        reg.get("alice")
    assert e.value.status == 404
    with pytest.raises(VoiceNotFound):
        reg.delete("alice")
    assert files(tmpdir_) == []


def test_idempotent_conflict_replace(make, monkeypatch):
    reg = make()
    a, b = audio_bytes(freq=200), audio_bytes(freq=400)
    v1 = reg.add("v", a, "a.wav")
    calls = []
    monkeypatch.setattr(voices_mod, "load_audio", lambda p: calls.append(p) or (_ for _ in ()).throw(AssertionError))
    assert reg.add("v", a, "other-name.wav") == v1  # same bytes: nothing decoded, nothing changed
    assert calls == []
    with pytest.raises(VoiceExists) as e:
        reg.add("v", b, "b.wav")
    assert e.value.status == 409 and isinstance(e.value, ValueError)
    monkeypatch.undo()
    old = reg.get("v").copy()
    v2 = reg.add("v", b, "b.wav", replace=True)
    assert v2.sha256 != v1.sha256
    assert not np.array_equal(reg.get("v"), old)
    assert len(reg) == 1


@pytest.mark.parametrize("name", ["../x", "", "a" * 65, ".hidden", "a/b", "x y", "..", "é", None])
def test_bad_names(make, tmp_path, tmpdir_, name):
    reg = make()
    with pytest.raises(InvalidVoiceName) as e:
        reg.add(name, audio_bytes(), "x.wav")
    assert e.value.status == 400
    assert "\n" not in str(e.value) and str(tmp_path) not in str(e.value)
    assert files(tmp_path / "voices") == [] and files(tmpdir_) == []


def test_good_names(make):
    reg = make(directory=None)
    for name in ("a", "A.b-c_1", "x" * 64, "v."):
        reg.add_embedding(name, np.eye(DIMS, dtype=np.float32)[0], builtin=False)


def test_too_large_refused_before_anything(make, tmp_path, tmpdir_, monkeypatch):
    reg = make(limits=VoiceLimits(max_upload_bytes=1000))

    def boom(*a, **k):
        raise AssertionError("must not be called")

    monkeypatch.setattr(voices_mod, "load_audio", boom)
    monkeypatch.setattr(voices_mod, "make_owned_dir", boom)
    with pytest.raises(VoiceTooLarge) as e:
        reg.add("../bad name", b"\0" * 1001, "/etc/passwd")  # size is checked before the name
    assert e.value.status == 413
    assert files(tmp_path / "voices") == [] and files(tmpdir_) == []


def test_durations(make, tmp_path, tmpdir_):
    reg = make(limits=VoiceLimits(min_seconds=1.0, max_seconds=3.0))
    with pytest.raises(VoiceDurationError) as e:
        reg.add("short", audio_bytes(0.5), "s.wav")
    assert e.value.status == 400 and "0.50 s" in str(e.value)
    with pytest.raises(VoiceDurationError) as e:  # a header that declares no samples: 0 s long
        reg.add("empty", audio_bytes(0.0), "e.wav")
    assert e.value.status == 400 and "0.00 s" in str(e.value)
    with pytest.raises(VoiceDurationError) as e:
        reg.add("long", audio_bytes(4.0, fmt="FLAC"), "l.flac")
    assert "limit is 3 s" in str(e.value)
    reg.add("ok", audio_bytes(2.0, fmt="FLAC"), "ok.flac")
    assert files(tmp_path / "voices") == ["ok.npz"] and files(tmpdir_) == []


def test_long_file_refused_from_header_without_decoding(make, monkeypatch, tmpdir_):
    reg = make(limits=VoiceLimits(max_seconds=3.0))
    monkeypatch.setattr(voices_mod, "load_audio", lambda p: (_ for _ in ()).throw(AssertionError("decoded")))
    with pytest.raises(VoiceDurationError):
        reg.add("long", audio_bytes(5.0), "l.wav")
    assert files(tmpdir_) == []


@pytest.mark.parametrize("data", [b"hello, not audio" * 100, b"RIFF\x10\x00\x00\x00WAVEjunk" + b"\0" * 64, b""])
def test_not_audio(make, tmp_path, tmpdir_, data):
    reg = make()
    with pytest.raises(InvalidVoiceAudio) as e:
        reg.add("x", data, "x.wav")
    msg = str(e.value)
    assert e.value.status == 400 and "\n" not in msg
    assert str(tmpdir_) not in msg and "upload" in msg
    assert files(tmp_path / "voices") == [] and files(tmpdir_) == []


def test_embed_failure_leaves_nothing(tmp_path, tmpdir_):
    def bad(path):
        raise RuntimeError("encoder crashed")

    reg = VoiceRegistry(tmp_path / "v", bad, VoiceLimits(), temp_dir=tmpdir_)
    with pytest.raises(RuntimeError):
        reg.add("x", audio_bytes(), "x.wav")
    assert files(tmp_path / "v") == [] and files(tmpdir_) == [] and len(reg) == 0


def test_store_full(make):
    reg = make(limits=VoiceLimits(max_voices=2))
    reg.add("a", audio_bytes(freq=100), "a.wav")
    reg.add("b", audio_bytes(freq=200), "b.wav")
    with pytest.raises(VoiceStoreFull) as e:
        reg.add("c", audio_bytes(freq=300), "c.wav")
    assert e.value.status in (503, 507)
    reg.add("a", audio_bytes(freq=400), "a.wav", replace=True)  # replacing needs no room


def test_builtin_voice(make, tmp_path):
    reg = make()
    emb = np.zeros(DIMS, np.float32)
    emb[0] = 1
    v = reg.add_embedding("demo", emb, builtin=True)
    assert v.builtin and [x.name for x in reg.list()] == ["demo"]
    with pytest.raises(VoiceProtected) as e:
        reg.delete("demo")
    assert e.value.status in (403, 409)
    with pytest.raises(VoiceProtected):
        reg.add("demo", audio_bytes(), "d.wav", replace=True)
    assert files(tmp_path / "voices") == []  # built-in voices are not written
    with pytest.raises(InvalidVoiceAudio):
        reg.add_embedding("bad", np.ones(DIMS, np.float32))  # not unit norm
    with pytest.raises(InvalidVoiceAudio):
        reg.add_embedding("bad", np.ones(DIMS + 1, np.float32) / np.sqrt(DIMS + 1))


def test_persistence_across_instances(make, tmp_path):
    reg = make()
    reg.add("alice", audio_bytes(freq=210), "a.wav")
    reg.add("bob", audio_bytes(freq=310), "b.wav")
    reg2 = make()
    assert reg2.list() == reg.list()
    np.testing.assert_array_equal(reg2.get("alice"), reg.get("alice"))
    reg2.delete("bob")
    assert [v.name for v in make().list()] == ["alice"]


def _npz(path, embedding, **extra):
    with open(path, "wb") as fh:
        np.savez(fh, embedding=embedding, **extra)


def test_directory_load_good_and_bad(make, tmp_path, caplog):
    d = tmp_path / "voices"
    d.mkdir()
    unit = np.zeros(DIMS, np.float32)
    unit[1] = 1
    _npz(d / "good.npz", unit, sha256=np.array("ab" * 32), created=np.array(5.0))
    _npz(d / "bare.npz", unit)  # sha256 and created are optional
    _npz(d / "notunit.npz", unit * 2)
    _npz(d / "nan.npz", np.full(DIMS, np.nan, np.float32))
    _npz(d / "shape.npz", np.eye(DIMS, dtype=np.float32))
    _npz(d / "dims.npz", np.ones(DIMS + 1, np.float32) / np.sqrt(DIMS + 1))
    (d / "noemb.npz").write_bytes(io.BytesIO().getvalue())
    with open(d / "other.npz", "wb") as fh:
        np.savez(fh, x=unit)
    (d / "junk.npz").write_bytes(b"not a zip")
    (d / "huge.npz").write_bytes(b"\0" * 5000)
    (d / "readme.txt").write_text("ignored")
    (d / "spoken.wav").write_bytes(audio_bytes(2.0))
    (d / "spoken2.flac").write_bytes(audio_bytes(2.0, freq=500, fmt="FLAC"))
    (d / "tooshort.wav").write_bytes(audio_bytes(0.2))
    (d / "broken.mp3").write_bytes(b"garbage" * 10)
    (d / "bad name.wav").write_bytes(audio_bytes(2.0))
    with caplog.at_level(logging.WARNING, logger="mvjax.serve.voices"):
        reg = make(limits=VoiceLimits(max_embedding_file_bytes=4096))
    assert [v.name for v in reg.list()] == ["bare", "good", "spoken", "spoken2"]
    assert reg.voice("good").sha256 == "ab" * 32 and reg.voice("good").created == 5.0
    for bad in ("notunit", "nan", "shape", "dims", "noemb", "other", "junk", "huge", "tooshort", "broken", "bad name"):
        assert bad in caplog.text, bad
    # audio files were embedded once and cached beside them
    assert (d / "spoken.npz").is_file() and (d / "spoken2.npz").is_file()
    np.testing.assert_array_equal(reg.get("spoken"), fake_embed(d / "spoken.wav"))

    calls = []

    def counting(p):
        calls.append(p)
        return fake_embed(p)

    reg2 = VoiceRegistry(d, counting, VoiceLimits(max_embedding_file_bytes=4096), dims=DIMS)
    assert calls == []  # cached embeddings are read, refused audio is never embedded
    assert [v.name for v in reg2.list()] == ["bare", "good", "spoken", "spoken2"]
    # edited audio: the stale cache is not served
    (d / "spoken.wav").write_bytes(audio_bytes(2.0, freq=700))
    reg3 = make(limits=VoiceLimits(max_embedding_file_bytes=4096))
    np.testing.assert_array_equal(reg3.get("spoken"), fake_embed(d / "spoken.wav"))
    # a voice made from the operator's audio file is not deleted (nor replaced) through the registry:
    # the file is an input, never removed by a client
    with pytest.raises(VoiceProtected):
        reg3.delete("spoken")
    with pytest.raises(VoiceProtected):
        reg3.add("spoken", audio_bytes(2.0, freq=300), "x.wav", replace=True)
    assert (d / "spoken.wav").exists() and "spoken" in make(limits=VoiceLimits(max_embedding_file_bytes=4096))


def test_directory_load_bounded_by_max_voices(make, tmp_path, caplog):
    d = tmp_path / "voices"
    d.mkdir()
    for i in range(5):
        e = np.zeros(DIMS, np.float32)
        e[i] = 1
        _npz(d / f"v{i}.npz", e)
    with caplog.at_level(logging.WARNING, logger="mvjax.serve.voices"):
        reg = make(limits=VoiceLimits(max_voices=3))
    assert len(reg) == 3 and "full" in caplog.text


def test_concurrent_adds_are_consistent(make, tmp_path, tmpdir_):
    reg = make(limits=VoiceLimits(max_voices=12))
    uploads = [audio_bytes(1.2, freq=100 + 37 * i) for i in range(8)]
    results, errors = [], []
    barrier = threading.Barrier(16)

    def worker(i):
        barrier.wait()
        try:
            # pairs of threads race on the same name: one with the same bytes, one different
            name = f"n{i % 8}"
            data = uploads[i % 8] if i < 12 else uploads[(i + 1) % 8]
            results.append((name, reg.add(name, data, "x.wav")))
        except VoiceError as exc:
            errors.append((name, exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(e, VoiceExists) for _, e in errors)
    assert len(reg) == 8 and len(results) + len(errors) == 16
    reloaded = make(limits=VoiceLimits(max_voices=12))
    for v in reg.list():
        assert reloaded.voice(v.name) == v
        np.testing.assert_array_equal(reloaded.get(v.name), reg.get(v.name))
    for name, v in results:
        assert reg.voice(name).sha256 == v.sha256  # every success is what is stored
    assert files(tmpdir_) == []
    assert files(tmp_path / "voices") == sorted(f"n{i}.npz" for i in range(8))


def test_concurrent_store_limit(make):
    reg = make(limits=VoiceLimits(max_voices=3))
    errors = []

    def worker(i):
        try:
            reg.add(f"v{i}", audio_bytes(1.1, freq=150 + 20 * i), "x.wav")
        except VoiceStoreFull as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reg) == 3 and len(errors) == 5


def test_failed_write_leaves_no_partial_file(make, tmp_path, monkeypatch):
    reg = make()
    first = reg.add("v", audio_bytes(freq=250), "v.wav")
    before = (tmp_path / "voices" / "v.npz").read_bytes()
    real = np.savez

    def failing(fh, **arrays):
        real(fh, **arrays)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(voices_mod.np, "savez", failing)
    with pytest.raises(VoiceStoreFull) as e:
        reg.add("w", audio_bytes(freq=260), "w.wav")
    assert str(tmp_path) not in str(e.value)
    with pytest.raises(VoiceStoreFull):
        reg.add("v", audio_bytes(freq=270), "v.wav", replace=True)
    monkeypatch.undo()
    assert files(tmp_path / "voices") == ["v.npz"]  # no temporary or partial file
    assert (tmp_path / "voices" / "v.npz").read_bytes() == before
    assert reg.list() == [first] and "w" not in reg


def test_in_memory_registry(make):
    reg = make(directory=None)
    reg.add("a", audio_bytes(), "a.wav")
    assert [v.name for v in reg.list()] == ["a"]
    reg.delete("a")
    assert len(reg) == 0


def test_messages_name_no_server_paths(make, tmp_path, tmpdir_):
    reg = make()
    for call in (
        lambda: reg.add("x", b"junk" * 10, "../../etc/x.wav"),
        lambda: reg.add("x", audio_bytes(0.1), "x.wav"),
        lambda: reg.get("missing"),
    ):
        with pytest.raises(VoiceError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and str(tmp_path) not in msg and "/tmp" not in msg, msg


def test_directory_load_refuses_packed_large_npz_and_survives_encoder_crash(tmp_path, caplog):
    d = tmp_path / "voices"
    d.mkdir()
    with open(d / "bomb.npz", "wb") as fh:
        np.savez_compressed(fh, embedding=np.zeros(4_000_000, np.float32))  # small file, 16 MB unpacked
    assert (d / "bomb.npz").stat().st_size < 1 << 20
    (d / "crash.wav").write_bytes(audio_bytes(2.0))

    def crash(path):
        raise RuntimeError("encoder crashed")

    with caplog.at_level(logging.WARNING, logger="mvjax.serve.voices"):
        reg = VoiceRegistry(d, crash, VoiceLimits(), dims=DIMS)
    assert len(reg) == 0
    assert "bomb.npz" in caplog.text and "crash.wav" in caplog.text
    assert not (d / "crash.npz").exists()


def test_get_returns_read_only(make):
    reg = make()
    reg.add("a", audio_bytes(), "a.wav")
    with pytest.raises(ValueError):
        reg.get("a")[0] = 2.0
