"""Adversarial checkpoints and a mutation fuzzer for the safe loader and the converter CLI.

Every crafted file goes through :func:`load_checkpoint` in-process and through
``python -m convert_weights --model-dir DIR --out OUT`` in a subprocess that runs under a
memory watchdog and a time limit. Each must give exit status 1, exactly one line on stderr
naming the file and the problem (never a traceback), leave nothing behind (no OUT, no
staging directory, no parent directory the run created) and stay within
:data:`PEAK_RSS_LIMIT` of resident memory.

Memory: a genuine conversion of all five fixture checkpoints (JAX included) peaks at about
470 MB resident and 1.8 GB of virtual address space on the 2-core build machine (JAX reserves
address space per CPU), so the child's address space is capped only loosely
(:data:`ADDRESS_SPACE_LIMIT`, a backstop) while a watchdog polls its resident set and kills it
past :data:`RSS_KILL`; the assertion is on the child's own peak RSS (its VmHWM at exit).

The fuzzer mutates the genuine fixture checkpoints with a fixed seed (zip metadata bytes,
the pickle re-zipped with valid CRCs, storage sizes, truncation, big-endian re-encoding) and
loads each in a memory-capped worker process: every case must fail with
:class:`CheckpointError` or load to plain data (the loader's own result checks), never raise
another exception, hang or crash. Where the content is unchanged (zip metadata mutations and
truncations, which the CRCs guard; the big-endian re-encoding) a load must give exactly the
original structure; a mutated pickle that still loads is a different, valid checkpoint.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from convert_weights import safe_pickle
from convert_weights.safe_pickle import (
    OMEGACONF_ALLOWED,
    CheckpointError,
    TensorInfo,
    UnsafeCheckpointError,
    check_checkpoint,
    load_checkpoint,
)
from convert_weights.safe_pickle import allowed as safe_pickle_allowed
from tests.conftest import REPO

PEAK_RSS_LIMIT = 1 << 30  # what any refused file of a few MB may cost the CLI, JAX included
RSS_KILL = 3 << 29  # 1.5 GiB: the watchdog kills the child here
ADDRESS_SPACE_LIMIT = 8 << 30  # backstop only (JAX reserves ~1.8 GB of address space on 2 cores)
CLI_TIMEOUT = 120  # seconds; a hang is a failure

# --- a tiny pickle assembler (protocol 2 opcodes, as torch writes them) ------------------------


def G(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def S(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def I(n: int) -> bytes:  # noqa: E743 - an opcode builder, named like the others
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def T(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def D(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def STORAGE(key: str, numel: int, stype: str = "FloatStorage") -> bytes:
    return T(S("storage"), G("torch", stype), S(key), S("cpu"), I(numel)) + b"Q"


def TENSOR(key: str, numel: int, offset: int, size, stride, stype: str = "FloatStorage") -> bytes:
    return G("torch._utils", "_rebuild_tensor_v2") + T(
        STORAGE(key, numel, stype), I(offset), T(*map(I, size)), T(*map(I, stride)), b"\x89", G("collections", "OrderedDict") + b")R"
    ) + b"R"


def PKL(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def MODEL(*pairs: tuple[str, bytes]) -> bytes:
    """``{"model": {name: value, ...}}`` (the shape of a GPT checkpoint's top level)."""
    return PKL(D((S("model"), D(*((S(k), v) for k, v in pairs)))))


def write_archive(path: Path, pkl: bytes, storages: dict | None = None, *, byteorder: bytes | None = b"little",
                  root: str = "archive", pkl_compress: int = zipfile.ZIP_STORED, extra: list | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo(f"{root}/data.pkl"), pkl, compress_type=pkl_compress)
        if byteorder is not None:
            z.writestr(f"{root}/byteorder", byteorder)
        z.writestr(f"{root}/version", b"3\n")
        for key, raw in (storages or {}).items():
            z.writestr(f"{root}/data/{key}", raw)
        for name, raw in extra or []:
            z.writestr(name, raw)
    return path


def floats(n: int) -> bytes:
    return np.arange(n, dtype="<f4").tobytes()


def stream_entry(z: zipfile.ZipFile, name: str, total: int, compress: int = zipfile.ZIP_DEFLATED, byte: bytes = b"\0"):
    """A ``total``-byte entry of one repeated byte, written in 1 MiB chunks (highly compressible)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = compress
    chunk = byte * (1 << 20)
    with z.open(info, "w", force_zip64=True) as f:
        for start in range(0, total, len(chunk)):
            f.write(chunk[: min(len(chunk), total - start)])


# --- the adversarial cases -----------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    name: str
    filename: str  # the released name it poses as
    build: object  # (path) -> None
    message: str  # a fragment the one-line error must contain
    loader_error: bool = True  # False: the loader accepts the file, the converter refuses it
    unsafe: bool = False  # the loader's error is an UnsafeCheckpointError


def _bad_tensor(offset, size, stride, numel=4):
    return lambda p: write_archive(p, MODEL(("w", TENSOR("0", numel, offset, size, stride))), {"0": floats(numel)})


def _zip_bomb_storage(p: Path):
    numel = 16 << 20  # 64 MiB of float zeros, ~64 KiB compressed
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", MODEL(("w", TENSOR("0", numel, 0, (numel,), (1,)))))
        z.writestr("archive/byteorder", b"little")
        stream_entry(z, "archive/data/0", numel * 4)


def _zip_bomb_pickle(p: Path):
    with zipfile.ZipFile(p, "w") as z:
        stream_entry(z, "archive/data.pkl", 80 << 20, byte=b"N")


def _inflated_pickle(p: Path):
    """A data.pkl under the size limit but inflating 1000-fold."""
    with zipfile.ZipFile(p, "w") as z:
        stream_entry(z, "archive/data.pkl", 16 << 20, byte=b"]")


def _truncated_zip(fixtures):
    def build(p: Path):
        data = (fixtures / "stage1" / "first_stage.pt").read_bytes()
        p.write_bytes(data[: len(data) // 2])
    return build


def _truncated_central_directory(fixtures):
    def build(p: Path):
        data = (fixtures / "stage1" / "first_stage.pt").read_bytes()
        p.write_bytes(data[:-30])
    return build


def _duplicate_entries(p: Path):
    import warnings

    pkl = MODEL(("w", TENSOR("0", 4, 0, (4,), (1,))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        write_archive(p, pkl, {"0": floats(4)}, extra=[("archive/data/0", floats(4))])


def _encrypted_entry(p: Path):
    write_archive(p, MODEL(("w", TENSOR("0", 4, 0, (4,), (1,)))), {"0": floats(4)})
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("archive/data/0")
    central = bytes(data).rfind(b"archive/data/0") - 46  # the central directory record of data/0
    assert data[central:central + 4] == b"PK\x01\x02"
    data[central + 8] |= 0x1  # general purpose flag: encrypted
    data[info.header_offset + 6] |= 0x1
    p.write_bytes(bytes(data))


def _bzip2_entry(p: Path):
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", MODEL(("w", TENSOR("0", 4, 0, (4,), (1,)))))
        z.writestr("archive/data/0", floats(4), compress_type=zipfile.ZIP_BZIP2)


def _copy_budget(p: Path):
    n = 1000  # one 4 MB storage, a thousand transposed (non-contiguous) views of it
    pkl = MODEL(*((f"w{i}", TENSOR("0", n * n, 0, (n, n), (1, n))) for i in range(n)))
    write_archive(p, pkl, {"0": np.zeros(n * n, "<f4").tobytes()})


def _call_budget(p: Path):
    body = S("x" * (1 << 20)) + b"q\x00" + b"]q\x01"  # a 1 MiB string in the memo, an empty list
    for _ in range(1000):  # _codecs.encode(that string) a thousand times: 1 GB of bytes
        body += b"h\x01" + G("_codecs", "encode") + b"h\x00" + S("latin1") + b"\x86Ra"
    write_archive(p, PKL(body))


def _opcode_budget(p: Path):
    write_archive(p, PKL(b"N0" * 1_500_000 + b"N"))


def _deep_lists(p: Path):
    n = 100_000
    write_archive(p, PKL(b"]" * n + b"a" * (n - 1)))


def _deep_tuples(p: Path):
    write_archive(p, PKL(b"N" + b"\x85" * 100_000))


def _deep_dict_keys(p: Path):
    write_archive(p, PKL(b"}" + b"N" + b"\x85" * 1000 + b"Ns"))


def _billion_laughs(p: Path):
    body = b"]q\x00Na"  # l0 = [None]; then l_k = [l_(k-1), l_(k-1)]: 2**59 leaves, 500 bytes
    for level in range(1, 60):
        prev = bytes([level - 1])
        body += b"0](h" + prev + b"h" + prev + b"eq" + bytes([level])
    write_archive(p, PKL(D((S("model"), body))))


def _cyclic_list(p: Path):
    write_archive(p, PKL(D((S("model"), b"]q\x00h\x00a"))))


def _self_ordered_dict(p: Path):
    body = G("collections", "OrderedDict") + b")Rq\x00" + S("a") + b"h\x00s"
    write_archive(p, PKL(D((S("model"), body))))


def _build_on_global(target: str, state: bytes):
    module, name = target.rsplit(".", 1)
    return lambda p: write_archive(p, PKL(D((S("model"), G(module, name) + state + b"b"))))


def _poisoned_encodec(p: Path):
    """EnCodec-named file that tries to turn every FloatStorage into doubles for later loads."""
    body = G("torch", "FloatStorage") + D((S("name"), S("DoubleStorage"))) + b"b0"
    body += G("collections", "OrderedDict") + b"N" + D((S("__setitem__"), G("collections", "OrderedDict"))) + b"\x86b0"
    write_archive(p, PKL(body + D()))


def _storage_two_types(p: Path):
    pkl = MODEL(("a", TENSOR("0", 4, 0, (4,), (1,))), ("b", TENSOR("0", 2, 0, (2,), (1,), "DoubleStorage")))
    write_archive(p, pkl, {"0": floats(4)})


def _mbd(cfg_value, **top):
    def build(p: Path):
        from convert_weights.torch_writer import save_checkpoint

        obj = {"sample_rate": 24000, "n_bands": 1, 0: {"cfg": cfg_value() if callable(cfg_value) else cfg_value,
                                                        "model_state": {}, "processor_state": {}}}
        obj.update(top)
        save_checkpoint(p, obj)
    return build


def _omegaconf(cfg):
    from convert_weights.torch_writer import omegaconf_config

    return lambda: omegaconf_config(cfg)


def _cyclic_dictconfig():
    from convert_weights.torch_writer import Global, NewObj

    node = NewObj(Global("omegaconf.dictconfig", "DictConfig"))
    node.state = {"_parent": None, "_content": {"channels": 1, "schedule": node}}
    return node


def _interpolation_blowup():
    cfg = {"diffusion_unet": {"hidden": 4}, "schedule": {"num_steps": 10}, "channels": 1}
    for level in range(40):  # x0 = {a: ${x1}, b: ${x1}}, x1 = {a: ${x2}, ...}: 2**40 values
        cfg["schedule"][f"x{level}"] = {"a": f"${{schedule.x{level + 1}}}", "b": f"${{schedule.x{level + 1}}}"}
    cfg["schedule"]["x40"] = 1
    return cfg


def _gpt(model_args=None, ranks=None):
    def build(p: Path):
        from convert_weights.torch_writer import save_checkpoint

        meta = {"tokenizer": {"name": "t", "pat_str": ".", "mergeable_ranks": ranks if ranks is not None else {b"a": 0},
                              "special_tokens": {"<|endoftext|>": 1}, "offset": 0}}
        save_checkpoint(p, {"model": {}, "model_args": model_args or {}, "meta": meta, "config": {}})
    return build


def cases(fixtures) -> list[Case]:
    fs, mbd, codec = "first_stage.pt", "mbd_comp_8.pt", "encodec_24khz-d7cc33bc.th"
    return [
        # tensors against their storage
        Case("negative_stride", fs, _bad_tensor(3, (30000,), (-1,)), "negative strides are not supported"),
        Case("huge_negative_stride", fs, _bad_tensor(0, (2, 2), (-(10**12), 1)), "negative strides are not supported"),
        Case("negative_offset", fs, _bad_tensor(-5, (2,), (1,)), "negative storage offset"),
        Case("offset_past_end", fs, _bad_tensor(3, (2,), (1,)), "runs past the end"),
        Case("scalar_offset_out_of_range", fs, _bad_tensor(4, (), ()), "runs past the end"),
        Case("stride0_huge_shape", fs, _bad_tensor(0, (100_000, 100_000), (0, 0), numel=1), "stride-0 views are not supported"),
        Case("shape_product_overflows_int64", fs, _bad_tensor(0, (2**40, 2**40, 2**40), (0, 0, 0), numel=1), "more than storage"),
        Case("dimension_past_int64", fs, _bad_tensor(0, (2**64,), (1,)), "out of range"),
        Case("zero_size_huge_dims", fs, _bad_tensor(0, (0, 2**61, 2**61), (1, 1, 1)), "too large to describe"),
        Case("size_stride_lengths_differ", fs, _bad_tensor(0, (2, 2), (1,)), "differ in length"),
        Case("missing_storage_entry", fs, lambda p: write_archive(p, MODEL(("w", TENSOR("7", 4, 0, (4,), (1,)))), {"0": floats(4)}),
             "not in the archive"),
        Case("storage_size_mismatch", fs, lambda p: write_archive(p, MODEL(("w", TENSOR("0", 10**9, 0, (4,), (1,)))), {"0": floats(4)}),
             "archive entry holds 16 bytes"),
        Case("storage_two_types", fs, _storage_two_types, "declared twice"),
        Case("newline_in_storage_key", fs, lambda p: write_archive(p, MODEL(("w", TENSOR("0\nerror: fake", 10**6, 0, (4,), (1,)))),
                                                                   {"0\nerror: fake": floats(4)}),
             "storage '0\\nerror: fake' declares 1000000 FloatStorage elements"),
        Case("storage_type_not_allowed", fs, lambda p: write_archive(p, MODEL(("w", TENSOR("0", 4, 0, (4,), (1,), "ComplexFloatStorage")))),
             "torch.ComplexFloatStorage", unsafe=True),
        Case("persistent_id_not_storage", fs, lambda p: write_archive(p, PKL(D((S("model"), S("x") + b"Q")))),
             "unsupported persistent id", unsafe=True),
        # the archive
        Case("zip_bomb_storage", fs, _zip_bomb_storage, "zip bomb"),
        Case("zip_bomb_pickle", fs, _zip_bomb_pickle, "at most 67108864"),
        Case("inflating_pickle", fs, _inflated_pickle, "zip bomb"),
        Case("truncated_zip", fs, _truncated_zip(fixtures), "not a PyTorch zip archive"),
        Case("truncated_central_directory", fs, _truncated_central_directory(fixtures), "not a PyTorch zip archive"),
        Case("duplicate_entries", fs, _duplicate_entries, "two entries named"),
        Case("no_data_pkl", fs, lambda p: _drop_pickle(p), "exactly one data.pkl"),
        Case("encrypted_entry", fs, _encrypted_entry, "encrypted"),
        Case("bzip2_entry", fs, _bzip2_entry, "compression method 12"),
        Case("byteorder_not_utf8", fs, lambda p: write_archive(p, MODEL(), byteorder=b"\xff\xfe\x00"), "not ASCII"),
        Case("byteorder_unknown", fs, lambda p: write_archive(p, MODEL(), byteorder=b"middle"), "not 'little' or 'big'"),
        # the pickle stream
        Case("binbytes8_huge_length", fs, lambda p: write_archive(p, b"\x80\x04\x8e" + struct.pack("<Q", 2**63) + b"."), "truncated"),
        Case("binunicode8_huge_length", fs, lambda p: write_archive(p, b"\x80\x04\x8d" + struct.pack("<Q", 2**40) + b"."), "truncated"),
        Case("long4_huge_length", fs, lambda p: write_archive(p, b"\x80\x02\x8b" + struct.pack("<i", 2**31 - 1) + b"."), "integer of"),
        Case("no_stop", fs, lambda p: write_archive(p, b"\x80\x02N"), "without STOP"),
        Case("empty_pickle", fs, lambda p: write_archive(p, b""), "without STOP"),
        Case("stack_underflow", fs, lambda p: write_archive(p, b"\x80\x02t."), "MARK"),
        Case("text_opcode", fs, lambda p: write_archive(p, b"I1\n."), "unsupported pickle opcode"),
        Case("ext_opcode", fs, lambda p: write_archive(p, b"\x80\x02\x82\x01."), "unsupported pickle opcode"),
        Case("memo_missing", fs, lambda p: write_archive(p, b"\x80\x02h\x05."), "never stored"),
        Case("opcode_budget", fs, _opcode_budget, "opcodes"),
        Case("call_budget", fs, _call_budget, "MiB of objects"),
        Case("copy_budget", fs, _copy_budget, "twice the storage bytes"),
        Case("deep_lists", fs, _deep_lists, "nested deeper than 100"),
        Case("deep_tuples", fs, _deep_tuples, "nested deeper than 100"),
        Case("deep_dict_key", fs, _deep_dict_keys, "nested deeper than 100"),
        Case("billion_laughs", fs, _billion_laughs, "expands to more than"),
        Case("colliding_int_keys", fs, lambda p: write_archive(p, PKL(b"}(" + b"".join(I(k * (2**61 - 1) + 1) + b"N" for k in range(20_000)) + b"u")),
             "more than 4096 tuple, frozenset or huge-integer"),
        Case("ordered_dict_with_arguments", fs, lambda p: write_archive(p, PKL(G("collections", "OrderedDict") + T(b"]" + T(I(1), I(2)) + b"a") + b"R")),
             "OrderedDict called with arguments"),
        Case("cyclic_list", fs, _cyclic_list, "cyclic containers"),
        Case("self_referencing_ordered_dict", fs, _self_ordered_dict, "cyclic containers"),
        Case("global_not_allowed", fs, lambda p: write_archive(p, PKL(G("os", "system") + T(S("true")) + b"R")), "os.system", unsafe=True),
        Case("build_on_storage_type", codec, _poisoned_encodec, "change the state of the global 'torch.FloatStorage'", unsafe=True),
        Case("build_slots_on_ordered_dict", codec, _build_on_global("collections.OrderedDict", b"N" + D((S("x"), I(1))) + b"\x86"),
             "change the state of the global 'collections.OrderedDict'", unsafe=True),
        Case("build_on_codecs_defaults", codec, _build_on_global("_codecs.encode", b"N" + D((S("__defaults__"), T(S("rot13")))) + b"\x86"),
             "change the state of the global '_codecs.encode'", unsafe=True),
        # content the loader returns but the converters refuse (one line, naming the file)
        Case("top_level_int", fs, lambda p: write_archive(p, PKL(I(5))), "holds int, not a dict", loader_error=False),
        Case("top_level_none", codec, lambda p: write_archive(p, PKL(b"N")), "holds NoneType, not a dict", loader_error=False),
        Case("memo_huge_index", fs, lambda p: write_archive(p, PKL(b"Nr\xff\xff\xff\xff")), "holds NoneType", loader_error=False),
        Case("n_bands_not_int", mbd, _mbd(_omegaconf({"channels": 1}), n_bands="abc"), "n_bands is 'abc'", loader_error=False),
        Case("self_interpolation", mbd, _mbd(_omegaconf({"channels": "${channels}", "diffusion_unet": {}, "schedule": {}})),
             "refers to itself", loader_error=False),
        Case("cyclic_interpolation", mbd, _mbd(_omegaconf({"diffusion_unet": {"hidden": "${schedule.h}"}, "schedule": {"h": "${diffusion_unet.hidden}"}})),
             "refers to itself", loader_error=False),
        Case("interpolation_blowup", mbd, _mbd(_omegaconf(_interpolation_blowup())), "expand to more than", loader_error=False),
        Case("cyclic_dictconfig", mbd, _mbd(_cyclic_dictconfig), "config contains a cycle", loader_error=False),
        Case("unet_depth_huge", mbd, _mbd(_omegaconf({"channels": 1, "diffusion_unet": {"depth": 10**9}, "schedule": {"num_steps": 10}})),
             "diffusion_unet.depth must be an integer between 1 and 64", loader_error=False),
        Case("tokenizer_rank_key_int", fs, _gpt({"block_size": 8, "vocab_sizes": [4], "n_layer": 1, "n_head": 1, "n_embd": 4},
                                                ranks={10**12: 0}), "mergeable_ranks has a key of type int", loader_error=False),
        Case("model_args_wrong_types", fs, _gpt({"block_size": "abc", "vocab_sizes": [4], "n_layer": 1, "n_head": 1, "n_embd": 4}),
             "unexpected checkpoint content (ValueError", loader_error=False),
    ]


def _drop_pickle(p: Path):
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", floats(4))
    return p


# --- running the CLI under limits -------------------------------------------------------------


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes: the child's VmHWM
    seconds: float
    killed_for_memory: bool


def _capped(code: str, limit: int) -> list[str]:
    """``python -c`` that caps its own address space first and, at exit, writes its peak resident
    set (VmHWM) to the file named by ``$MVJAX_TEST_HWM``. No preexec_fn: this process may run JAX
    threads, and forking a multithreaded process to run Python code can deadlock. (The rusage of
    a vfork'ed child cannot be used: Linux folds the parent's resident high-water mark into it.)"""
    boot = f"""
import atexit, os, resource
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
def _report_hwm():
    target = os.environ.get("MVJAX_TEST_HWM")
    if target:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open(target, "w") as f:
            f.write(str(kb * 1024))
atexit.register(_report_hwm)
"""
    return [sys.executable, "-c", boot + code]


# ``python -m convert_weights`` under the address-space backstop.
CLI = _capped("import runpy; runpy.run_module('convert_weights', run_name='__main__', alter_sys=True)", ADDRESS_SPACE_LIMIT)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_cli(model_dir: Path, out: Path, *extra: str, on_stdout_line=None) -> Run:
    """``python -m convert_weights`` with a memory watchdog and a time limit; peak RSS from the child."""
    hwm_file = tempfile.NamedTemporaryFile(prefix="hwm-", delete=False)
    hwm_file.close()
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", MVJAX_TEST_HWM=hwm_file.name)
    seen = [0]
    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen([*CLI, "--model-dir", str(model_dir), "--out", str(out), *extra],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err)
        done = threading.Event()
        killed = []

        def watchdog():
            while not done.wait(0.01):
                rss = _rss(proc.pid)
                seen[0] = max(seen[0], rss)
                if rss > RSS_KILL or time.monotonic() - start > CLI_TIMEOUT:
                    killed.append("memory" if rss > RSS_KILL else "time")
                    proc.kill()
                    return

        chunks = []

        def reader():
            for line in proc.stdout:
                chunks.append(line)
                if on_stdout_line is not None:
                    on_stdout_line(proc, line.decode())

        threads = [threading.Thread(target=watchdog, daemon=True), threading.Thread(target=reader, daemon=True)]
        for t in threads:
            t.start()
        proc.wait()
        done.set()
        threads[1].join(10)
        seconds = time.monotonic() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if killed == ["time"]:
        pytest.fail(f"convert_weights ran past {CLI_TIMEOUT} s on {model_dir}")
    reported = Path(hwm_file.name).read_text()
    os.unlink(hwm_file.name)
    peak = int(reported) if reported else seen[0]  # the child's own VmHWM; else the watchdog's view
    return Run(proc.returncode, b"".join(chunks).decode(errors="replace"), stderr, peak, seconds, killed == ["memory"])


def assert_one_line_failure(run: Run, *fragments: str, code: int = 1):
    assert not run.killed_for_memory, f"killed past {RSS_KILL >> 20} MiB resident"
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == code, (run.returncode, run.stderr[-2000:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert run.peak_rss <= PEAK_RSS_LIMIT, f"peak RSS {run.peak_rss >> 20} MiB"


@pytest.fixture(scope="module")
def adversarial(fixtures, tmp_path_factory):
    """Every case built once and run through the CLI (two at a time); name -> (case, path, Run)."""
    root = tmp_path_factory.mktemp("adversarial")
    built = []
    for case in cases(fixtures):
        work = root / case.name
        (work / "src").mkdir(parents=True)
        path = work / "src" / case.filename
        case.build(path)
        built.append((case, path, work))

    def one(item):
        case, path, work = item
        # OUT under parents that do not exist yet: a failed run must remove them again.
        return case.name, (case, path, run_cli(work / "src", work / "new" / "dir" / "out"))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(one, built))
    return results


CASE_NAMES = [c.name for c in cases(Path("/nonexistent"))]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_adversarial_file_is_refused_by_loader_and_cli(name, adversarial):
    case, path, run = adversarial[name]
    extra = OMEGACONF_ALLOWED if case.filename.startswith("mbd_") else None
    if case.loader_error:
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path, extra)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and case.message in message, message
        assert isinstance(err.value, UnsafeCheckpointError) == case.unsafe, message
        with pytest.raises(type(err.value)):  # the vetting pass refuses it the same way
            check_checkpoint(path, extra)
    else:
        load_checkpoint(path, extra)
    assert_one_line_failure(run, str(path), case.message)
    # No OUT, no staging directory, and the parents of OUT this run created are gone again.
    assert sorted(p.name for p in path.parent.parent.iterdir()) == ["src"]


def test_tiny_files_cost_little_memory(adversarial):
    """The memory bombs of the issue, by size: files of a few MB, peaks well under 1 GB."""
    for name in ("stride0_huge_shape", "zip_bomb_storage", "zip_bomb_pickle", "inflating_pickle", "call_budget",
                 "copy_budget", "opcode_budget", "billion_laughs", "memo_huge_index"):
        case, path, run = adversarial[name]
        assert path.stat().st_size < 8 << 20, (name, path.stat().st_size)
        assert run.peak_rss < PEAK_RSS_LIMIT, (name, run.peak_rss >> 20)
    case, path, _ = adversarial["stride0_huge_shape"]
    assert path.stat().st_size < 1024


def test_in_process_loads_stay_small(adversarial):
    """The same bombs in this process: resident growth stays bounded (a refusal frees what it read)."""
    import gc

    before = _rss(os.getpid())
    for name in ("zip_bomb_storage", "zip_bomb_pickle", "inflating_pickle", "call_budget", "copy_budget", "stride0_huge_shape"):
        case, path, _ = adversarial[name]
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
        gc.collect()
    assert _rss(os.getpid()) - before < 300 << 20


# --- no state survives a load ----------------------------------------------------------------


def _global_state() -> dict:
    """Everything a pickle could have reached through the allow-lists, by value."""
    state = {"STORAGE_DTYPES": dict(safe_pickle.STORAGE_DTYPES)}
    for table in ("BASE_ALLOWED", "OMEGACONF_ALLOWED"):
        for key, value in getattr(safe_pickle, table).items():
            snap = {"id": id(value)}
            if isinstance(value, type):
                snap["dict"] = {k: id(v) for k, v in vars(value).items()}
            elif isinstance(value, types.FunctionType):
                snap["defaults"] = value.__defaults__
                snap["kwdefaults"] = value.__kwdefaults__
                snap["dict"] = dict(vars(value))
            elif dataclasses.is_dataclass(value):
                snap["fields"] = dataclasses.asdict(value)
                snap["dict"] = dict(getattr(value, "__dict__", {}))
            state[(table, key)] = snap
        state[table] = dict(getattr(safe_pickle, table))
    return state


def _summary(obj):
    """Everything a load returned, tensor bytes included."""
    return _structure(obj, values=True)


def test_poisoned_file_changes_nothing_for_later_loads(fixtures, adversarial):
    genuine = fixtures / "stage1" / "first_stage.pt"
    clean = _summary(load_checkpoint(genuine))
    snapshot = _global_state()
    for name in ("build_on_storage_type", "build_slots_on_ordered_dict", "build_on_codecs_defaults", "global_not_allowed"):
        _, path, _ = adversarial[name]
        with pytest.raises(UnsafeCheckpointError):
            load_checkpoint(path)
        assert _global_state() == snapshot, name
    after = load_checkpoint(genuine)
    assert _summary(after) == clean
    assert all(v.dtype == np.float32 for v in after["model"].values())
    assert type(after["model"]) is safe_pickle_allowed._OrderedDict and not vars(after["model"])


def test_poisoned_sibling_refuses_the_directory(fixtures, adversarial, tmp_path):
    """A crafted EnCodec file beside genuine checkpoints: the directory is refused before any
    conversion; the genuine files, converted after the refusal in the same process, give exactly
    the parameters a fresh process gives."""
    from convert_weights.convert import convert_directory

    _, poison, _ = adversarial["build_on_storage_type"]
    src = tmp_path / "src"
    src.mkdir()
    for sub, name in (("speaker", "speaker_encoder.pt"), ("stage2", "second_stage.pt")):
        (src / name).symlink_to(fixtures / sub / name)
    clean = tmp_path / "clean"
    shutil.copytree(src, clean, symlinks=True)
    shutil.copy(poison, src / poison.name)

    run = run_cli(src, tmp_path / "out")
    assert_one_line_failure(run, str(src / poison.name), "change the state of the global")
    assert "converting" not in run.stdout  # refused before converting anything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "src"]

    with pytest.raises(UnsafeCheckpointError):
        convert_directory(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "src"]
    here = convert_directory(clean, tmp_path / "here")
    fresh = run_cli(clean, tmp_path / "fresh")
    assert fresh.returncode == 0, fresh.stderr
    there = json.loads((tmp_path / "fresh" / "manifest.json").read_text())
    assert here == there  # params_sha256 of every component identical


# --- the CLI's own failure modes ---------------------------------------------------------------


def test_out_is_a_file(fixtures, tmp_path):
    target = tmp_path / "out"
    target.write_text("keep me")
    run = run_cli(fixtures / "stage2", target)
    assert_one_line_failure(run, str(target), "is not a directory")
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _mount_read_only(path: Path) -> bool:
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def test_out_on_read_only_filesystem(fixtures, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() != 0:
        ro.chmod(0o555)
    elif not _mount_read_only(ro):
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    else:
        mounted = True
    try:
        run = run_cli(fixtures / "stage2", ro / "out")
        assert_one_line_failure(run, f"converting into {ro / 'out'} failed")
        assert list(ro.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=False)
        ro.chmod(0o755)


def test_ctrl_c_during_conversion(fixtures, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for sub, name in (("stage1", "first_stage.pt"), ("stage2", "second_stage.pt"), ("speaker", "speaker_encoder.pt")):
        (src / name).symlink_to(fixtures / sub / name)
    sent = []

    def interrupt(proc, line):
        if line.startswith("converting") and not sent:
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            sent.append(line)

    run = run_cli(src, tmp_path / "out", on_stdout_line=interrupt)
    assert sent, run.stdout + run.stderr
    assert_one_line_failure(run, "interrupted", code=130)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT, no staging directory


# --- the mutation fuzzer -----------------------------------------------------------------------

FUZZ_SEED = 20240613
FUZZ_CASES = 160
FUZZ_SOURCES = ("stage1/first_stage.pt", "stage2/second_stage.pt", "mbd/mbd_comp_8.pt", "speaker/speaker_encoder.pt")


def _rezip(entries: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for info, data in entries:  # a fixed timestamp: the same seed gives the same bytes
            z.writestr(zipfile.ZipInfo(info.filename, date_time=(2024, 1, 1, 0, 0, 0)), data, compress_type=zipfile.ZIP_STORED)
    return buf.getvalue()


def _mutate_bytes(rng: random.Random, data: bytes, positions: list[int] | None = None) -> bytes:
    out = bytearray(data)
    if not out:
        return bytes(out)
    kind = rng.choice(["flip", "flip", "byte", "insert", "delete", "duplicate", "opcode"])
    pick = (lambda: rng.choice(positions)) if positions else (lambda: rng.randrange(len(out)))
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            out[pick()] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        out[pick()] = rng.randrange(256)
    elif kind == "opcode":  # a random opcode from the ones the interpreter knows
        out[pick()] = rng.choice(b".\x80\x95(012N\x88\x89JKM\x8a\x8bGX\x8c\x8dBC\x8e)t\x85\x86\x87]lae}dsu\x8f\x90\x91c\x93R\x81\x92bQhjqr\x94")
    elif kind == "insert":
        at = pick()
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == "delete":
        at = pick()
        del out[at:at + rng.randint(1, 16)]
    else:
        at = pick()
        out[at:at] = out[at:at + rng.randint(1, 64)]
    return bytes(out)


def fuzz_inputs(fixtures: Path, seed: int = FUZZ_SEED, count: int = FUZZ_CASES):
    """Deterministic mutated archives: (description, file name, bytes, structure-preserving?)."""
    rng = random.Random(seed)
    sources = {}
    for rel in FUZZ_SOURCES:
        raw = (fixtures / rel).read_bytes()
        with zipfile.ZipFile(fixtures / rel) as z:
            infos = z.infolist()
            entries = [(info, z.read(info)) for info in infos]
            start_dir = z.start_dir
        meta = list(range(start_dir, len(raw)))  # central directory + end record
        for info in infos:  # local headers
            meta.extend(range(info.header_offset, info.header_offset + 30 + len(info.filename)))
        sources[rel] = (raw, entries, meta)
    for i in range(count):
        rel = FUZZ_SOURCES[i % len(FUZZ_SOURCES)]
        raw, entries, meta = sources[rel]
        kind = rng.choice(["zip", "pickle", "pickle", "pickle", "storage", "truncate", "byteorder"])
        if kind == "zip":  # CRCs still guard data.pkl and every storage: a file that loads is unchanged
            data, same = _mutate_bytes(rng, raw, meta), True
        elif kind == "pickle":
            new = [(info, _mutate_bytes(rng, data) if info.filename.endswith("data.pkl") else data) for info, data in entries]
            data, same = _rezip(new), False
        elif kind == "storage":
            j = rng.choice([k for k, (info, _) in enumerate(entries) if "/data/" in info.filename])
            new = list(entries)
            info, blob = new[j]
            new[j] = (info, blob[: -rng.randint(1, 8)] if rng.random() < 0.5 else blob + bytes(rng.randint(1, 8)))
            data, same = _rezip(new), False
        elif kind == "truncate":
            data, same = raw[: rng.randrange(len(raw))], True
        else:  # the same storages read as big-endian: other numbers, same structure
            new = [(info, b"big" if info.filename.endswith("byteorder") else data) for info, data in entries]
            data, same = _rezip(new), True
        yield f"{i}:{rel}:{kind}", Path(rel).name, data, same


def _structure(obj, values: bool = False):
    """Containers, keys, scalars, configs, and each tensor's dtype and shape (its bytes too with ``values``)."""
    if isinstance(obj, dict):
        return {k: _structure(v, values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_structure(v, values) for v in obj]
    if isinstance(obj, np.ndarray):
        return ("array", str(obj.dtype), obj.shape) + ((obj.tobytes(),) if values else ())
    if isinstance(obj, safe_pickle_allowed._ConfigObject):
        return ("config", json.dumps(safe_pickle.plain_config(obj), sort_keys=True, default=str))
    return obj


def fuzz_worker(fixtures: str, out_dir: str, seed: int, count: int) -> None:
    """Run in a memory-capped subprocess: one JSON line per case on stdout."""
    fixtures_path = Path(fixtures)
    reference = {rel: _structure(load_checkpoint(fixtures_path / rel, OMEGACONF_ALLOWED)) for rel in FUZZ_SOURCES}
    for desc, name, data, same in fuzz_inputs(fixtures_path, seed, count):
        path = Path(out_dir) / name
        path.write_bytes(data)
        start = time.monotonic()
        record = {"case": desc}
        try:
            loaded = load_checkpoint(path, OMEGACONF_ALLOWED)
            record["outcome"] = "loaded"
            structure = _structure(loaded)
            if same:
                rel = next(r for r in FUZZ_SOURCES if r.endswith(name))
                record["same_structure"] = structure == reference[rel]
        except CheckpointError as exc:
            record["outcome"] = type(exc).__name__
            record["message"] = str(exc)
        except BaseException as exc:  # noqa: BLE001 - exactly what the fuzzer is looking for
            record["outcome"] = f"UNEXPECTED {type(exc).__name__}"
            record["message"] = repr(exc)[:500]
        record["seconds"] = round(time.monotonic() - start, 3)
        print(json.dumps(record), flush=True)
        path.unlink()


def test_mutation_fuzzer(fixtures, tmp_path):
    code = ("from tests.test_loader_fuzz import fuzz_worker; "
            f"fuzz_worker({str(fixtures)!r}, {str(tmp_path)!r}, {FUZZ_SEED}, {FUZZ_CASES})")
    start = time.monotonic()
    hwm = tmp_path / "hwm"
    # No JAX in the worker (numpy and the loader), so a 3 GiB address space is plenty.
    proc = subprocess.Popen(_capped(code, 3 << 30), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(REPO), MVJAX_TEST_HWM=str(hwm)))
    try:
        stdout, stderr = (b.decode() for b in proc.communicate(timeout=300))
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the fuzz worker ran past 300 s (a hang)")
    assert proc.returncode == 0, f"fuzz worker died ({proc.returncode}) after {time.monotonic() - start:.0f} s: {stderr[-3000:]}"
    records = [json.loads(line) for line in stdout.splitlines()]
    assert len(records) == FUZZ_CASES
    bad = [r for r in records if r["outcome"] not in ("loaded", "CheckpointError", "UnsafeCheckpointError")]
    assert not bad, bad[:5]
    assert all(r.get("same_structure", True) for r in records), [r for r in records if not r.get("same_structure", True)]
    assert all("\n" not in r.get("message", "") for r in records)
    slow = [r for r in records if r["seconds"] > 10]
    assert not slow, slow
    assert int(hwm.read_text()) < PEAK_RSS_LIMIT
    outcomes = collections.Counter(r["outcome"] for r in records)
    assert outcomes["CheckpointError"] > 20 and outcomes["loaded"] > 10, outcomes  # the fuzzer reaches both sides


def test_fuzz_inputs_are_deterministic(fixtures):
    a = [(d, hash(data)) for d, _, data, _ in fuzz_inputs(fixtures, count=12)]
    b = [(d, hash(data)) for d, _, data, _ in fuzz_inputs(fixtures, count=12)]
    assert a == b


def test_check_checkpoint_reads_no_storage_bytes(fixtures):
    skeleton = check_checkpoint(fixtures / "stage1" / "first_stage.pt")
    loaded = load_checkpoint(fixtures / "stage1" / "first_stage.pt")
    assert skeleton.keys() == loaded.keys()
    for key, value in loaded["model"].items():
        info = skeleton["model"][key]
        assert isinstance(info, TensorInfo) and info.shape == value.shape and info.dtype == value.dtype
