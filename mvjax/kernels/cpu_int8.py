"""A CPU kernel for int8 weight-only matmuls, built on first use with the system C++ compiler.

Why: XLA's CPU backend (jaxlib 0.10) cannot dequantise int8 weights inside a dot. For
``jnp.dot(w_int8.astype(f32), x)`` it materialises the whole float32 copy of ``w`` before
the dot (every decode step, 2x slower than plain float32); ``dot(int8, int8) -> int32``
runs in YNNPACK with kernels that vectorise along the (tiny) activation dimension and
gains little. Measurements: benchmarks/RESULTS.md, "int8 first stage".

The kernel computes ``y (O, N) = wscale[:, None] * (w (O, K) @ xq.T) * xscale[None, :]`` with
``w`` int8 and ``xq`` (N, K) int16: activations are rounded per column to 15 bits
(|q| <= 16383, relative error <= 3e-5 of the column's largest value, ~100x below the int8
weight error), products are accumulated exactly in int32 (AVX2 ``vpmaddwd``) and converted
to float32 once per output. Each weight row is streamed once for all N columns; rows are
split over XLA's intra-op thread pool. Needs x86-64 with AVX2 and FMA, Linux, and a C++17
compiler (``$CXX``, else ``c++``/``g++``/``clang++``); the shared library is cached under
``$MVJAX_CACHE/kernels`` (default ``~/.cache/mvjax``), keyed by the source, jaxlib version
and compiler. Where it cannot be built :func:`int8_matmul_available` is False and callers use
plain XLA (:func:`mvjax.kernels.int8.int8_matmul_xla`). ``MVJAX_CPU_KERNELS=0`` disables it.
The C++ sources are ``int8_matmul.cc``, ``int4_matmul.cc`` (with ``int4_matmul_tile.h``),
``cache_attention.cc`` and ``parallel_for.h`` beside this module (package data), compiled into one
library with ``-Wall -Wextra -Werror``: the int4 product (:func:`kernel_int4_matmul`, dispatched by
:func:`mvjax.kernels.int4.int4_matmul`) and a decode step's attention over the KV cache
(:mod:`mvjax.kernels.cache_attention`) are registered with the int8 matmul.

The int4 kernel reads group-wise 4-bit weights in the layout of :mod:`mvjax.kernels.int4` (G = 32
or a multiple of 64) and never writes a float copy of them: per 64 inputs it loads 32 bytes of
nibbles, splits them into low and high codes in registers and multiplies them with activations
rounded per column and group of G to int8 (|q| <= 127: the step is the group's largest magnitude
/ 127, so an entry moves by at most 1/254 of that magnitude), exactly in int32 (AVX2
``vpmaddubsw``/``vpmaddwd``; AVX-512 VNNI ``vpdpbusd`` where the CPU has it, chosen at run time,
:func:`int4_isa`). Each group's integer dot is scaled once by the weight scale times the activation
step; the minimums meet the *unrounded* float sums of the activations, and so does the codes'
middle (7.5): the rounding touches only ``scale * (code - 7.5)``, half a group's range at most
(int4_matmul.cc has the algebra). That error is small beside the 4-bit weights' own (a code step
is 1/15 of a group's range): tests/test_int4_kernels.py measures both.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from mvjax.core.atomic import atomic_path
from mvjax.core.paths import cache_root
from mvjax.kernels.platform import vary_like, varying_axes

log = logging.getLogger("mvjax")

TARGET = "mvjax_int8_matmul"
ACTIVATION_MAX = 16383  # int16 activations: |q| <= 2**14 - 1 keeps every int32 lane exact for 4096-long blocks

INT4_TARGET = "mvjax_int4_matmul"
INT4_ACTIVATION_MAX = 127  # int8 activations per column and group, symmetric
INT4_ISAS = {"auto": 0, "avx2": 1, "avx512vnni": 2}  # the int4 kernel's ``isa`` attribute

# The kernels' C++ sources ship as package data beside this module, built into one library
# (parallel_for.h holds the thread-pool split they share; int4_matmul_tile.h the int4 kernel's
# loops, compiled once per instruction set).
SOURCE_FILES = ("int8_matmul.cc", "int4_matmul.cc", "cache_attention.cc", "parallel_for.h", "int4_matmul_tile.h")
# FFI target name -> the handler symbol the library exports.
TARGETS = {
    TARGET: "MvjaxInt8Matmul",
    INT4_TARGET: "MvjaxInt4Matmul",
    "mvjax_f32_attention": "MvjaxF32Attention",
    "mvjax_bf16_attention": "MvjaxBf16Attention",
    "mvjax_int8_attention": "MvjaxInt8Attention",
}


def kernel_source(name: str = SOURCE_FILES[0]) -> str:
    return resources.files("mvjax.kernels").joinpath(name).read_text()

_lock = threading.Lock()
_state: dict = {}


def _cpu_has_avx2_fma() -> bool:
    """x86-64 Linux with AVX2 and FMA (and F16C, which every such CPU has: the int4 kernel reads
    float16 scales with it)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return {"avx2", "fma", "f16c"} <= flags
    return False


def _compiler() -> Optional[str]:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        path = shutil.which(name)
        if path:
            return path
    return None


_CXXFLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror")


def _build(cache: Path, compiler: str) -> Path:
    include = jax.ffi.include_dir()
    sources = {name: kernel_source(name) for name in SOURCE_FILES}
    key = hashlib.sha256("\0".join([*sources.values(), jaxlib.__version__, compiler, *_CXXFLAGS]).encode()).hexdigest()[:16]
    lib = cache / "kernels" / key / "libmvjax_int8.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent builders write the same bytes; each renames its own complete file into place.
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp, atomic_path(lib, suffix=".so") as out:
        paths = []
        for name, text in sources.items():
            (Path(tmp) / name).write_text(text)
            if name.endswith(".cc"):
                paths.append(str(Path(tmp) / name))
        # jaxlib's FFI headers are included as system headers: our warnings flags are for our code.
        res = subprocess.run([compiler, *_CXXFLAGS, "-isystem", include, *paths, "-o", str(out)],
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {res.stderr.strip()[-2000:]}")
    return lib


def int8_matmul_available() -> bool:
    """Whether the CPU kernels (the int8 matmul and the compact-cache attention) are built and
    registered (built on the first call)."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok, why = False, ""
        if os.environ.get("MVJAX_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
            why = "disabled by MVJAX_CPU_KERNELS"
        elif not _cpu_has_avx2_fma():
            why = "needs an x86-64 Linux CPU with AVX2 and FMA"  # (and F16C)
        elif (compiler := _compiler()) is None:
            why = "no C++ compiler found (set CXX)"
        else:
            try:
                lib = ctypes.cdll.LoadLibrary(str(_build(cache_root(), compiler)))
                for target, symbol in TARGETS.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                _state["lib"] = lib  # keep the handle alive
                ok = True
            except Exception as exc:  # noqa: BLE001 - any failure means: use the XLA path
                why = f"build failed: {exc}"
        if not ok:
            log.warning("int8 CPU kernel unavailable (%s); int8 weights are dequantised by XLA instead, "
                        "which is slower than float32 on CPU", why)
        _state["ok"], _state["why"] = ok, why
        return ok


def cpu_kernels_ready() -> bool:
    """Whether a program lowered for CPU should call the kernels: they are built and registered.
    Where JAX computes on the CPU this builds them on first use (:func:`int8_matmul_available`);
    in a process whose default backend is an accelerator (which traces the CPU branch of the
    kernel dispatch too, see :mod:`mvjax.kernels.platform`) it only reports a build made
    earlier, so an accelerator host never compiles the C++ library for a branch it does not run."""
    if jax.default_backend() == "cpu":
        return int8_matmul_available()
    with _lock:
        return _state.get("ok", False)


def quantize_activations(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x (K, N) float -> (int16 (N, K), float32 scale (N,)): per column, |q| <= ACTIVATION_MAX.
    A column holding NaN or inf has no meaningful scale (its codes are 0 or garbage);
    :func:`mvjax.kernels.int8.int8_matmul` replaces that column's outputs."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=0)
    scale = jnp.where(amax > 0, amax / ACTIVATION_MAX, 1.0)
    q = jnp.round(x / scale[None, :]).astype(jnp.int16)
    return q.T, scale


def kernel_int8_matmul(w: jnp.ndarray, wscale: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """``(w * wscale[:, None]) @ x`` for int8 ``w`` (O, K) and finite float ``x`` (K, N) -> float32 (O, N)
    through the kernel (call :func:`int8_matmul_available` first). Non-finite activations are
    the caller's business: :func:`mvjax.kernels.int8.int8_matmul` handles them."""
    xq, xscale = quantize_activations(x)
    out = jax.ShapeDtypeStruct((w.shape[0], x.shape[1]), jnp.float32)
    y = jax.ffi.ffi_call(TARGET, out)(w, wscale.astype(jnp.float32), xq, xscale)
    return vary_like(y, varying_axes(w, wscale, x))  # inside shard_map, varying as its operands


def int4_isa() -> Optional[str]:
    """The instruction set the int4 kernel picks here (``avx512vnni`` or ``avx2``), or None where the
    kernels are not built (:func:`int8_matmul_available`)."""
    if not int8_matmul_available():
        return None
    lib = _state["lib"]
    lib.MvjaxInt4Isa.restype = ctypes.c_int
    return {v: k for k, v in INT4_ISAS.items()}[lib.MvjaxInt4Isa()]


def int4_kernel_takes(entry: dict) -> bool:
    """Whether the int4 kernel handles this matrix's group size (G = 32 or a multiple of 64: its
    loops work in 64-input blocks of one group, or of two groups of 32); other layouts run in XLA."""
    q4, scale = entry["q4"], entry["scale"]
    if scale.shape[1] == 0 or (2 * q4.shape[1]) % scale.shape[1]:
        return False
    group = 2 * q4.shape[1] // scale.shape[1]
    return group == 32 or group % 64 == 0


def kernel_int4_matmul(q4: jnp.ndarray, scale: jnp.ndarray, mins: jnp.ndarray, x: jnp.ndarray,
                       isa: str = "auto") -> jnp.ndarray:
    """``dequantize({"q4", "scale", "min"}) @ x`` for finite float ``x`` (K, N) -> float32 (O, N) through
    the int4 kernel (call :func:`int8_matmul_available` first; the group size must pass
    :func:`int4_kernel_takes`). ``isa``: ``auto`` (the best this CPU has), ``avx2`` or ``avx512vnni``
    (tests run both). Activations are rounded inside the kernel (module docstring); non-finite
    ones are the caller's business: :func:`mvjax.kernels.int4.int4_matmul` handles them."""
    out = jax.ShapeDtypeStruct((q4.shape[0], x.shape[1]), jnp.float32)
    y = jax.ffi.ffi_call(INT4_TARGET, out)(q4, scale.astype(jnp.float16), mins.astype(jnp.float16),
                                           x.astype(jnp.float32), isa=np.int32(INT4_ISAS[isa]))
    return vary_like(y, varying_axes(q4, scale, mins, x))
