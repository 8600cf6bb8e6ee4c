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


# --- tensors are checked against their storage, like torch's own weights_only loader ---------


def _state_dict_archive(path, offset, size, stride, numel=4):
    """A torch-layout archive whose one tensor has the given view of a float storage."""
    import struct

    def s(text):
        return b"X" + struct.pack("<I", len(text)) + text.encode()

    def i(n):
        if -(2**31) <= n < 2**31:
            return b"J" + struct.pack("<i", n)
        raw = n.to_bytes(8, "little", signed=True)
        return b"\x8a\x08" + raw  # LONG1

    pid = b"(" + s("storage") + b"ctorch\nFloatStorage\n" + s("0") + s("cpu") + i(numel) + b"tQ"
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + i(offset) + b"(" + b"".join(map(i, size)) + b"t("
              + b"".join(map(i, stride)) + b"t\x89ccollections\nOrderedDict\n)RtR")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}(" + s("w") + tensor + b"u.")
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        z.writestr("archive/data/0", np.arange(numel, dtype="<f4").tobytes())
    return path


@pytest.mark.parametrize("offset, size, stride, problem", [
    (3, (30000,), (-1,), "negative strides are not supported"),  # would read the heap before the storage
    (0, (2, 2), (-(10**12), 1), "negative strides are not supported"),  # used to segfault
    (-5, (2,), (1,), "negative storage offset"),
    (3, (2,), (1,), "runs past the end"),
    (4, (), (), "runs past the end"),  # a scalar one past the last element
])
def test_views_outside_their_storage_are_refused_like_torch(tmp_path, offset, size, stride, problem):
    import torch

    path = _state_dict_archive(tmp_path / "x.pt", offset, size, stride)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(path)


def test_in_bounds_views_load_like_torch(tmp_path):
    import torch

    for offset, size, stride in [(1, (3,), (1,)), (0, (2, 2), (1, 2)), (3, (), ()), (4, (0,), (1,))]:
        path = _state_dict_archive(tmp_path / "ok.pt", offset, size, stride)
        ours = load_checkpoint(path)["w"]
        ref = torch.load(path, weights_only=True)["w"].numpy()
        assert ours.shape == ref.shape and ours.flags.c_contiguous
        np.testing.assert_array_equal(ours, ref)


def test_expanded_tensor_is_refused_with_a_clear_message(tmp_path):
    """torch saves ``expand`` views as stride 0; this loader refuses them (a tiny file could
    otherwise describe gigabytes), naming the tensor's shape and its storage."""
    import torch

    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(1000)}, path)
    with pytest.raises(CheckpointError, match=r"shape \(1000,\) has 1000 elements, more than storage .* stride-0"):
        load_checkpoint(path)


def test_contiguous_tensors_are_read_only_views(fixtures):
    ckpt = load_checkpoint(fixtures / "stage1" / "first_stage.pt")
    for value in ckpt["model"].values():
        assert value.flags.c_contiguous and not value.flags.writeable


def test_deflated_archive_loads_like_the_stored_one(fixtures, tmp_path):
    src = fixtures / "stage2" / "second_stage.pt"
    packed = tmp_path / "second_stage.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    a, b = load_checkpoint(src), load_checkpoint(packed)
    assert a.keys() == b.keys() and a["model_args"] == b["model_args"]
    for key, value in a["model"].items():
        np.testing.assert_array_equal(b["model"][key], value)


def test_big_endian_archive(tmp_path):
    import torch

    state = {"f32": torch.randn(3, 4), "i64": torch.arange(5), "bf16": torch.randn(4).bfloat16(), "b": torch.tensor([True, False])}
    little = tmp_path / "little.pt"
    torch.save(state, little)
    big = tmp_path / "big.pt"
    ours_little = load_checkpoint(little)
    with zipfile.ZipFile(little) as zin, zipfile.ZipFile(big, "w") as zout:
        keys = {}
        for key, tensor in state.items():  # which storage belongs to which dtype
            keys[key] = tensor.element_size()
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                size = {0: 4, 1: 8, 2: 2, 3: 1}[int(info.filename.rsplit("/", 1)[1])]
                data = np.frombuffer(data, f"u{size}").byteswap().tobytes()
            zout.writestr(info, data)
    ours_big = load_checkpoint(big)
    for key in state:
        assert ours_big[key].dtype == ours_little[key].dtype
        np.testing.assert_array_equal(ours_big[key], ours_little[key])
