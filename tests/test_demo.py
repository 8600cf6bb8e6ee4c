"""The torch-free checkpoint writer and the on-the-fly random demo model (mvjax.sources.demo)."""

import collections
import json
import sys
import types

import ml_dtypes
import numpy as np
import pytest

from convert_weights import random_checkpoints, torch_writer
from convert_weights.safe_pickle import (
    OMEGACONF_ALLOWED,
    UnsafeCheckpointError,
    load_checkpoint,
    plain_config,
)
from convert_weights.torch_writer import (
    Global,
    NewObj,
    Reduce,
    TorchWriterError,
    omegaconf_config,
    save_checkpoint,
)
from mvjax.sources import demo

ALL_DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.bool_,
              np.float64, np.int16, np.int8, np.uint8]


def _arrays(rng):
    out = collections.OrderedDict()
    for dtype in ALL_DTYPES:
        name = np.dtype(dtype).name
        if np.dtype(dtype) == np.bool_:
            out[name] = rng.random((3, 5)) > 0.5
        elif np.issubdtype(np.dtype(dtype), np.integer):
            info = np.iinfo(dtype)
            out[name] = rng.integers(info.min, info.max, (2, 3, 4), dtype=dtype, endpoint=True)
        else:
            out[name] = rng.standard_normal((4, 6)).astype(dtype)
    out["scalar"] = np.array(2.5, np.float32)
    out["empty"] = np.zeros((0, 3), np.float32)
    out["transposed_view"] = np.arange(12, dtype=np.float32).reshape(3, 4).T  # not contiguous
    out["big_endian"] = np.arange(5, dtype=">f4")
    return out


# --- writer ------------------------------------------------------------------------------


def test_state_dict_loads_with_real_torch(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    state = _arrays(rng)
    state["tied"] = state["float32"]  # the same array twice: one shared storage, as torch writes tied weights
    obj = {"model": state, "meta": {"ranks": {b"\x00": 0, b"ab\xff": 1, b"": 2}, "list": [1, -7, 2**40, 70000, 0.5, None, True],
                                    "tuple": (1, "two", 3.0, (4,), ()), 7: "int key", "inf": float("inf")}}
    path = save_checkpoint(tmp_path / "state.pt", obj)
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded["model"], collections.OrderedDict) and list(loaded["model"]) == list(state)
    for key, want in state.items():
        got = loaded["model"][key]
        assert tuple(got.shape) == want.shape and got.is_contiguous()
        got = got.float().numpy() if got.dtype == torch.bfloat16 else got.numpy()
        np.testing.assert_array_equal(got, np.asarray(want).astype(got.dtype), err_msg=key)
    assert loaded["model"]["float16"].dtype == torch.float16 and loaded["model"]["bfloat16"].dtype == torch.bfloat16
    assert loaded["model"]["int64"].dtype == torch.int64 and loaded["model"]["bool"].dtype == torch.bool
    assert loaded["model"]["tied"].untyped_storage().data_ptr() == loaded["model"]["float32"].untyped_storage().data_ptr()
    assert loaded["meta"] == obj["meta"]


def test_round_trip_through_our_reader_is_exact(tmp_path):
    state = _arrays(np.random.default_rng(1))
    path = save_checkpoint(tmp_path / "x.pt", {"model": state, "n": 3})
    loaded = load_checkpoint(path)
    assert loaded["n"] == 3 and list(loaded["model"]) == list(state)
    for key, want in state.items():
        got = loaded["model"][key]
        assert got.dtype == want.dtype.newbyteorder("=") and got.shape == want.shape, key
        assert got.tobytes() == np.ascontiguousarray(want).astype(got.dtype).tobytes(), key


def test_output_is_deterministic_and_aligned(tmp_path):
    import zipfile

    obj = {"a": np.arange(7, dtype=np.float32), "b": [np.ones((2, 2), np.float16)], "c": b"xyz"}
    a = save_checkpoint(tmp_path / "a.pt", obj).read_bytes()
    b = save_checkpoint(tmp_path / "b.pt", obj, root="a").read_bytes()
    assert a == b
    with zipfile.ZipFile(tmp_path / "a.pt") as z:
        names = z.namelist()
        assert {"a/data.pkl", "a/byteorder", "a/version", "a/data/0", "a/data/1"} <= set(names)
        assert z.read("a/version") == b"3\n" and z.read("a/byteorder") == b"little"
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            if "/data/" in info.filename:
                assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"x": np.zeros(3, np.float32)})
    before = path.read_bytes()
    calls = []
    real = torch_writer._write_member

    def failing(zf, fh, name, payload, align):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(zf, fh, name, payload, align)

    monkeypatch.setattr(torch_writer, "_write_member", failing)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"x": np.ones(3, np.float32), "y": np.ones(4, np.float32)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_unsupported_values_are_refused(tmp_path):
    with pytest.raises(TorchWriterError):
        save_checkpoint(tmp_path / "x.pt", {"x": object()})
    with pytest.raises(TorchWriterError):
        save_checkpoint(tmp_path / "x.pt", {"x": np.zeros(2, np.complex64)})
    assert not (tmp_path / "x.pt").exists()


def test_omegaconf_objects_round_trip(tmp_path):
    # Dict-only configs (what the diffusion checkpoint holds) load with exactly the reader's allow-list.
    cfg = {"channels": 1, "name": "band", "rate": 0.5, "flag": False, "none": None, "big": 2**40,
           "nested": {"depth": 2, "inner": {"three": 3.0}, "empty": {}}}
    path = save_checkpoint(tmp_path / "cfg.pt", {"cfg": omegaconf_config(cfg), "w": np.ones(2, np.float32), 0: {"k": 1}})
    loaded = load_checkpoint(path, OMEGACONF_ALLOWED)
    assert plain_config(loaded["cfg"]) == cfg
    assert loaded[0] == {"k": 1} and loaded["w"].tolist() == [1.0, 1.0]
    # Nodes point at their parents: the DictConfig is shared, not copied.
    root = loaded["cfg"]
    child = root._state["_content"]["nested"]
    assert child._state["_parent"] is root and child._state["_content"]["depth"]._state["_parent"] is child
    with pytest.raises(UnsafeCheckpointError, match="omegaconf"):
        load_checkpoint(path)


def test_omegaconf_list_configs_round_trip(tmp_path):
    # omegaconf records ListConfig keys as ``int`` (ContainerMetadata.key_type), a global the
    # reader's OMEGACONF_ALLOWED does not list yet, so this load adds it.
    cfg = {"cutoffs": [100, 2000.5, None], "deep": [[1, "two"], {"three": [3]}], "empty": []}
    path = save_checkpoint(tmp_path / "cfg.pt", {"cfg": omegaconf_config(cfg)})
    loaded = load_checkpoint(path, {**OMEGACONF_ALLOWED, ("builtins", "int"): int})
    assert plain_config(loaded["cfg"]) == cfg


def test_generic_global_nodes(tmp_path):
    # NewObj + state, Reduce with SETITEMS: what a DictConfig-free custom object looks like.
    node = NewObj(Global("omegaconf.nodes", "AnyNode"), state={"_val": 5, "_parent": None})
    od = Reduce(Global("collections", "OrderedDict"), items=[("a", 1), ("b", np.arange(3, dtype=np.int64))])
    path = save_checkpoint(tmp_path / "g.pt", {"node": node, "od": od, "again": node})
    loaded = load_checkpoint(path, OMEGACONF_ALLOWED)
    assert plain_config(loaded["node"]) == 5 and loaded["again"] is loaded["node"]
    assert list(loaded["od"]) == ["a", "b"] and loaded["od"]["b"].tolist() == [0, 1, 2]


# --- demo checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    return random_checkpoints.write_random_checkpoints(tmp_path_factory.mktemp("demo_src"), seed=0)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo.demo_model_dir(tmp_path_factory.mktemp("cache"), seed=0)


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("stage,sub", [("first_stage", "stage1"), ("second_stage", "stage2")])
def test_gpt_files_have_the_released_layout(demo_files, fixtures, stage, sub):
    ours = load_checkpoint(demo_files[stage])
    ref = load_checkpoint(fixtures / sub / f"{stage}.pt")
    assert set(ref) - {"best_val_loss"} <= set(ours)
    assert set(ours["model_args"]) == set(ref["model_args"])
    assert set(ours["meta"]) == set(ref["meta"]) and set(ours["meta"]["tokenizer"]) == set(ref["meta"]["tokenizer"])
    tok = ours["meta"]["tokenizer"]
    assert tok["pat_str"] == ref["meta"]["tokenizer"]["pat_str"]
    assert tok["special_tokens"] == {"<|endoftext|>": 512} and len(tok["mergeable_ranks"]) == 512
    assert sorted(tok["mergeable_ranks"].values()) == list(range(512))
    assert all(tok["mergeable_ranks"][bytes([i])] == i for i in range(256))
    assert ours["meta"]["speaker_emb_size"] == 256 and ours["meta"]["speaker_cond"] is True
    assert ours["config"]["causal"] == ours["model_args"]["causal"] == ref["model_args"]["causal"]
    # Same key set as the fixture (both have two layers); released vocabulary layout and block size.
    assert set(ours["model"]) == set(ref["model"])
    args = ours["model_args"]
    if stage == "first_stage":
        assert args["vocab_sizes"] == [2562] and args["target_vocab_sizes"] is None and tok["offset"] == 2049
        assert args["block_size"] == 2048 and args["norm_type"] == "rmsnorm" and args["nonlinearity_type"] == "swiglu"
        np.testing.assert_array_equal(ours["model"]["_orig_mod.lm_heads.0.weight"], ours["model"]["_orig_mod.transformer.wtes.0.weight"])
    else:
        assert args["vocab_sizes"] == [1538, 1025] and args["target_vocab_sizes"] == [1025] * 6 and tok["offset"] == 1025
        assert args["block_size"] == 1024 and args["norm_type"] == "layernorm" and args["nonlinearity_type"] == "gelu"
        assert args["causal"] is False and args["bias"] is False


def test_speaker_file_matches_the_fixture(demo_files, fixtures):
    ours = load_checkpoint(demo_files["speaker_encoder"])
    ref = load_checkpoint(fixtures / "speaker" / "speaker_encoder.pt")
    assert set(ours) == set(ref)
    assert _shapes(ours["model_state"]) == _shapes(ref["model_state"])


def test_encodec_file_matches_the_encodec_package(demo_files):
    if "torchaudio" not in sys.modules:
        try:
            import torchaudio  # noqa: F401
        except Exception:  # encodec imports it for file helpers only
            sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    import warnings

    import encodec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = load_checkpoint(demo_files["encodec"])
    assert list(ours) == list(want) and _shapes(ours) == want
    # The package's own model takes the file as is (strict), through torch's safe loader.
    import torch

    model.load_state_dict(torch.load(demo_files["encodec"], weights_only=True), strict=True)
    # Weight norm starts at g = ||v||: the folded weight equals v.
    v, g = ours["decoder.model.3.convtr.convtr.weight_v"], ours["decoder.model.3.convtr.convtr.weight_g"]
    np.testing.assert_allclose(np.sqrt((v.astype(np.float64) ** 2).sum(axis=(1, 2), keepdims=True)), g, rtol=1e-6)


def test_mbd_file_has_the_released_structure(demo_files, fixtures):
    ours = load_checkpoint(demo_files["mbd"], OMEGACONF_ALLOWED)
    ref = load_checkpoint(fixtures / "mbd" / "mbd_comp_8.pt", OMEGACONF_ALLOWED)
    assert set(ours) == set(ref) and ours["n_bands"] == 4 and ours["sample_rate"] == 24000
    for b in range(4):
        assert set(ours[b]) == set(ref[b])
        assert type(ours[b]["cfg"]).__name__ == "_DictConfig"
        cfg, ref_cfg = plain_config(ours[b]["cfg"]), plain_config(ref[b]["cfg"])
        assert set(cfg) == set(ref_cfg)
        for section in ("diffusion_unet", "schedule", "processor", "filter"):
            assert set(cfg[section]) == set(ref_cfg[section]), section
        assert cfg["filter"]["idx_band"] == b
        pstate = ours[b]["processor_state"]
        if cfg["processor"]["use"]:
            ref_p = next(ref[i]["processor_state"] for i in range(4) if ref[i]["processor_state"])
            assert _shapes(pstate) == _shapes(ref_p)
        else:
            assert len(pstate) == 0
    total = sum(v.size for b in range(4) for v in ours[b]["model_state"].values())
    ref_total = sum(v.size for b in range(4) for v in ref[b]["model_state"].values())
    assert total < ref_total


# --- converted demo directory ------------------------------------------------------------


def test_demo_dir_converts_and_loads(demo_dir):
    from mvjax.io import checkpoint as C

    manifest = json.loads((demo_dir / "manifest.json").read_text())
    assert set(manifest["components"]) == {"first_stage", "second_stage", "speaker_encoder", "encodec", "mbd"}
    cfg1, _, tok1 = C.load_gpt_stage(demo_dir, "first_stage", verify=True)
    cfg2, _, tok2 = C.load_gpt_stage(demo_dir, "second_stage", verify=True)
    assert cfg1.causal and cfg1.tied_heads and cfg1.vocab_sizes == (2562,) and cfg1.block_size == 2048
    assert not cfg2.causal and cfg2.output_vocab_sizes == (1025,) * 6 and cfg2.block_size == 1024
    assert tok1.offset == 2049 and tok2.offset == 1025 and tok1.eot_token == 2561
    spk_cfg, _, _ = C.load_speaker_encoder(demo_dir, verify=True)
    assert (spk_cfg.num_layers, spk_cfg.input_size, spk_cfg.hidden_size, spk_cfg.embedding_size) == (3, 40, 256, 256)
    codec_cfg, _ = C.load_encodec(demo_dir, verify=True)
    assert codec_cfg.ratios == (8, 5, 4, 2) and codec_cfg.n_q == 32 and codec_cfg.dimension == 128
    mbd_cfg, _ = C.load_mbd(demo_dir, verify=True)
    assert mbd_cfg.n_bands == 4 and len(mbd_cfg.bands) == 4


def test_demo_dir_is_reused(demo_dir, monkeypatch):
    stamp = (demo_dir / "manifest.json").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("rebuilt a complete demo directory")

    monkeypatch.setattr(demo, "write_random_released", boom)
    assert demo.demo_model_dir(demo_dir.parents[1], seed=0) == demo_dir
    assert (demo_dir / "manifest.json").stat().st_mtime_ns == stamp


def test_demo_build_is_deterministic_in_the_seed(demo_dir, tmp_path):
    def digests(path):
        manifest = json.loads((path / "manifest.json").read_text())
        return {name: entry["params_sha256"] for name, entry in manifest["components"].items()}

    same = demo.demo_model_dir(tmp_path / "again", seed=0)
    assert same == tmp_path / "again" / "demo" / "v1-seed0"
    assert digests(same) == digests(demo_dir)
    other = digests(demo.demo_model_dir(tmp_path / "again", seed=1))
    assert all(other[name] != digest for name, digest in digests(demo_dir).items())


def test_one_cache_root(monkeypatch, tmp_path):
    """Every cache (converted models, demo, speaker embeddings, XLA, kernels) hangs off one root."""
    from mvjax.core.paths import cache_root

    monkeypatch.setenv("MVJAX_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("MVJAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "mvjax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "mvjax"


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_bad_seed(bad, tmp_path):
    with pytest.raises(ValueError):
        demo.demo_model_dir(tmp_path, seed=bad)


def test_tokenizer_round_trips_english(demo_dir):
    from mvjax.io.checkpoint import load_gpt_stage
    from mvjax.text.tokenizer import normalize_text

    _, _, tok = load_gpt_stage(demo_dir, "first_stage")
    texts = [
        "This is a demo of the MetaVoice pipeline.",
        "She said: \"I'll be there at 7:30, won't you?\" - and then left... quickly!",
        "Numbers like 1,024 and 3.14159 work too; so do CAPITALS and mixed-Case words.",
        normalize_text("Caf\u00e9 cr\u00e8me \u2014 na\u00efve fa\u00e7ade \u2018quoted\u2019."),
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids[-1] == tok.eot_token == 2561
        assert all(2049 <= i < 2561 for i in ids[:-1])
        assert tok.decode(ids[:-1]) == text
    common = "the lighthouse keeper wrote about the weather and the boats"
    assert len(tok.encode(common)) < len(common) / 2  # merges learned from English compress English


def test_bpe_trainer_is_deterministic():
    ranks = random_checkpoints.train_bpe(random_checkpoints.TRAINING_TEXT)
    assert ranks == random_checkpoints.train_bpe(random_checkpoints.TRAINING_TEXT) and len(ranks) == 512
    assert sorted(ranks.values()) == list(range(512))
    assert {b" the", b" and", b"ing"} <= set(ranks)


def test_gpt_forward_smoke(demo_dir):
    from mvjax.io.checkpoint import load_gpt_stage
    from mvjax.nn.gpt import forward

    spk = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    spk /= np.linalg.norm(spk)
    cfg, params, tok = load_gpt_stage(demo_dir, "first_stage")
    ids = tok.encode("Hello from the demo.") + [5, 1024 + 7, 9]
    (logits,) = forward(cfg, params, np.array(ids)[None, None], spk)
    assert logits.shape == (1, len(ids), 2562) and np.isfinite(np.asarray(logits)).all()

    cfg, params, tok = load_gpt_stage(demo_dir, "second_stage")
    text = tok.encode("Hello.")[:-1]
    row0 = text + [3, 4, 5, 1024]
    row1 = [1024] * len(text) + [6, 7, 8, 1024]
    outs = forward(cfg, params, np.array([row0, row1])[None], spk)
    assert len(outs) == 6
    for logits in outs:
        assert logits.shape == (1, len(row0), 1025) and np.isfinite(np.asarray(logits)).all()


def test_speaker_audio_and_embedding(demo_dir):
    from mvjax.inference.speaker import ShortReferenceWarning, SpeakerEncoder

    audio, rate = demo.demo_speaker_audio()
    assert rate == 22050 and audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size / rate - 4.0) < 0.01 and np.isclose(np.abs(audio).max(), 0.5)
    again, _ = demo.demo_speaker_audio(seed=0)
    other, _ = demo.demo_speaker_audio(seed=1)
    np.testing.assert_array_equal(audio, again)
    assert not np.array_equal(audio, other)
    encoder = SpeakerEncoder.load(demo_dir, cache_dir=None)
    with pytest.warns(ShortReferenceWarning):
        emb = encoder.embed_audio(audio, rate)
    assert emb.shape == (256,) and np.isfinite(emb).all()
    assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5
