import pickle
import zipfile

import numpy as np
import pytest

from convert_weights.safe_pickle import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
)


def _write_archive(path, payload: bytes, storages: dict[str, bytes] | None = None):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)


class _RunsShell:
    """Pickles to ``os.system(cmd)``: the classic payload."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


def test_malicious_pickle_is_refused_and_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "first_stage.pt"
    _write_archive(evil, pickle.dumps({"model": _RunsShell(f"touch {marker}")}, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(evil)
    assert "system" in str(err.value) and ("posix" in str(err.value) or "os" in str(err.value))
    assert not marker.exists()


def test_eval_and_getattr_globals_are_refused(tmp_path):
    class CallsEval:
        def __reduce__(self):
            return (eval, ("__import__('os').getcwd()",))

    evil = tmp_path / "x.pt"
    _write_archive(evil, pickle.dumps(CallsEval()))
    with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
        load_checkpoint(evil)


def test_codecs_encode_only_latin1(tmp_path):
    import _codecs

    class OtherCodec:
        def __reduce__(self):
            return (_codecs.encode, ("abc", "rot13"))

    evil = tmp_path / "x.pt"
    _write_archive(evil, pickle.dumps(OtherCodec()))
    with pytest.raises(UnsafeCheckpointError, match="rot13"):
        load_checkpoint(evil)


def test_not_a_zip_is_a_clear_error(tmp_path):
    bad = tmp_path / "legacy.pt"
    bad.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="not a PyTorch zip archive"):
        load_checkpoint(bad)


def test_matches_torch_load_for_every_dtype(tmp_path):
    import torch
    state = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(7),
        "view": torch.randn(4, 6)[:, 1:5].t(),  # non-contiguous view with an offset
        "scalar": torch.tensor(3.5),
        "bool": torch.tensor([True, False]),
    }
    state["tied"] = state["f32"]
    path = tmp_path / "m.pt"
    torch.save({"model": state, "meta": {"bytes": {b"ab": 1}, "s": "x"}}, path)
    ours = load_checkpoint(path)
    ref = torch.load(path, weights_only=True)
    for key, tensor in ref["model"].items():
        expect = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        got = ours["model"][key]
        assert got.shape == tuple(tensor.shape), key
        np.testing.assert_array_equal(np.asarray(got, dtype=expect.dtype), expect)
    assert str(ours["model"]["bf16"].dtype) == "bfloat16"
    assert ours["meta"] == {"bytes": {b"ab": 1}, "s": "x"}


def test_fixture_checkpoints_load_like_torch(fixtures):
    import torch
    for rel in ("stage1/first_stage.pt", "stage2/second_stage.pt"):
        ours = load_checkpoint(fixtures / rel)
        ref = torch.load(fixtures / rel, weights_only=True)
        assert ours["model_args"] == ref["model_args"]
        assert ours["meta"]["tokenizer"]["mergeable_ranks"] == ref["meta"]["tokenizer"]["mergeable_ranks"]
        for key, tensor in ref["model"].items():
            np.testing.assert_array_equal(ours["model"][key], tensor.numpy())
