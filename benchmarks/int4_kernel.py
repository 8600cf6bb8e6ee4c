"""The int4 CPU kernel against the int8 kernel and a float32 XLA dot, matrix by matrix.

    python -m benchmarks.int4_kernel [--batch 1 2 8] [--group 64] [--repeats 7] [--rounds 3]
    python -m benchmarks.int4_kernel --quick      # smoke run at the fixture's shapes

Shapes: one layer of the released first stage (``benchmarks.decode.make_config("full")``): c_attn
(3D, D), the attention's c_proj (D, D), w1 and w3 (H, D), the MLP's c_proj (D, H), D = 2048,
H = 5632. Each variant multiplies its own set of distinct matrices of one shape (at least
``--megabytes`` of weights, so they come from memory as in a decode step, not from the 32 MB L3)
by the same activations (K, N) in one jitted call, and reports per matrix: ms, weight bytes read
per second (``GB_per_s``) and that over the machine's read bandwidth (a jitted 2 GB sum, as
``benchmarks.decode`` measures it: ``roofline_frac``). Variants:

* ``float32``: ``jnp.dot`` of float32 weights (XLA's own library);
* ``int8``: :func:`mvjax.kernels.int8.int8_matmul` as the decoder calls it (activations rounded to
  int16 in XLA, the non-finite check, the kernel); ``int8-kernel``: the kernel's custom call alone
  on activations rounded beforehand (what the rest costs: the difference);
* ``int4``: :func:`mvjax.kernels.int4.int4_matmul` as the decoder calls it (the kernel rounds its
  activations itself; the non-finite check); ``int4-kernel``: the custom call alone.

Runs of the variants are interleaved (``--rounds`` passes over all variants of a shape, each
``--repeats`` timed calls) and the median of every run of a variant is reported. Guidance makes a
batch-1 decode step multiply N = 2 columns.

Machine-readable lines:
  int4-kernel shape=<O>x<K> n=<N> variant=<v> ms=<median per matrix> GB_per_s=<g> roofline_frac=<f> matrices=<L>
  int4-kernel-layer n=<N> variant=<v> ms=<one layer: the shapes weighted as a layer has them> speedup_vs_int8=<x>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.decode import make_config, measure_bandwidth
from mvjax.io.quantize import quantize_rows
from mvjax.kernels import cpu_int8
from mvjax.kernels import int4 as K4
from mvjax.kernels import int8 as K8


def layer_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, out, in, matrices of that shape in a layer) of one first-stage layer."""
    d, h = config.n_embd, config.mlp_hidden
    return [("c_attn", 3 * d, d, 1), ("attn.c_proj", d, d, 1), ("w1,w3", h, d, 2), ("mlp.c_proj", d, h, 1)]


def _int4_entry(key, out: int, k: int, group: int) -> dict:
    kq, ks, km = jax.random.split(key, 3)
    return {"q4": jax.random.bits(kq, (out, k // 2), jnp.uint8),
            "scale": (0.01 * jax.random.uniform(ks, (out, k // group))).astype(jnp.float16),
            "min": (-0.08 * jax.random.uniform(km, (out, k // group))).astype(jnp.float16)}


def build(variant: str, key, out: int, k: int, group: int, megabytes: float, most: int) -> tuple[list, int]:
    """Distinct weight matrices for ``variant``, at least ``megabytes`` of them (two at least, at most
    ``most``), and the bytes one of them reads."""
    if variant.startswith("int4"):
        make = jax.jit(lambda key: _int4_entry(key, out, k, group))
    elif variant.startswith("int8"):
        make = jax.jit(lambda key: quantize_rows(0.02 * jax.random.normal(key, (out, k))))
    else:
        make = jax.jit(lambda key: 0.02 * jax.random.normal(key, (out, k)))
    nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(jax.eval_shape(make, key)))
    copies = min(most, max(2, int(np.ceil(megabytes * 1e6 / nbytes))))
    weights = [make(key) for key in jax.random.split(key, copies)]
    jax.block_until_ready(weights)
    return weights, nbytes


def product(variant: str):
    """The per-matrix product of ``variant``: (weights, x (K, N)) -> (O, N)."""
    if variant == "float32":
        return lambda w, x: jnp.dot(w, x, preferred_element_type=jnp.float32)
    if variant == "int8":
        return K8.int8_matmul
    if variant == "int8-kernel":
        def call(w, xq_scale):
            xq, xscale = xq_scale
            out = jax.ShapeDtypeStruct((w["q"].shape[0], xq.shape[0]), jnp.float32)
            return jax.ffi.ffi_call(cpu_int8.TARGET, out)(w["q"], w["scale"], xq, xscale)
        return call
    if variant == "int4":
        return K4.int4_matmul
    if variant == "int4-kernel":
        return lambda w, x: cpu_int8.kernel_int4_matmul(w["q4"], w["scale"], w["min"], x)
    raise ValueError(variant)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 8], help="activation columns N")
    parser.add_argument("--group", type=int, default=64, help="int4 group size G")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved passes over the variants")
    parser.add_argument("--megabytes", type=float, default=256.0, help="weights per variant and shape (>> L3)")
    parser.add_argument("--max-matrices", type=int, default=256, help="at most this many matrices per variant")
    parser.add_argument("--variants", nargs="+", default=["float32", "int8", "int8-kernel", "int4", "int4-kernel"])
    parser.add_argument("--quick", action="store_true", help="the fixture's shapes, few repeats (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.rounds, args.megabytes, args.max_matrices = [1, 3], 2, 1, 0.0, 2
    if not cpu_int8.int8_matmul_available():
        print(f"CPU kernels unavailable ({cpu_int8._state.get('why')}); nothing to compare", file=sys.stderr)
        return 1
    config = make_config("tiny" if args.quick else "full")
    bandwidth = measure_bandwidth(0.05 if args.quick else 2.0)
    print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  int4 isa={cpu_int8.int4_isa()}  "
          f"group={args.group}  read bandwidth={bandwidth:.1f} GB/s", flush=True)

    layer: dict = {}  # (n, variant) -> ms of one layer
    key = jax.random.key(0)
    for name, out, k, count in layer_shapes(config):
        key, sub = jax.random.split(key)
        sets = {variant: build(variant, sub, out, k, args.group, args.megabytes, args.max_matrices)
                for variant in args.variants}
        for n in args.batch:
            calls = {}
            for variant, (weights, _) in sets.items():
                f = product(variant)
                # Activations of its own for every matrix, as in a decode step (the same ones would let
                # XLA share the int8 path's activation rounding between the products).
                xs = [jax.random.normal(jax.random.fold_in(sub, i), (k, n), jnp.float32) for i in range(len(weights))]
                if variant == "int8-kernel":
                    xs = [cpu_int8.quantize_activations(x) for x in xs]
                # All matrices in one program, their outputs summed so none is dropped.
                run = jax.jit(lambda ws, xs, f=f: sum(f(w, x) for w, x in zip(ws, xs)))
                jax.block_until_ready(run(weights, xs))  # compile
                calls[variant] = (lambda run=run, weights=weights, xs=xs: run(weights, xs))
            runs = {variant: [] for variant in calls}
            for _ in range(args.rounds):
                for variant, call in calls.items():
                    runs[variant] += timed(call, args.repeats)
            for variant, times in runs.items():
                weights, nbytes = sets[variant]
                per = statistics.median(times) / len(weights)
                gbps = nbytes / per / 1e9
                layer[(n, variant)] = layer.get((n, variant), 0.0) + count * per * 1e3
                print(f"int4-kernel shape={out}x{k} n={n} variant={variant} ms={per * 1e3:.4f} GB_per_s={gbps:.2f} "
                      f"roofline_frac={gbps / bandwidth:.3f} matrices={len(weights)}  ({name})", flush=True)
        del sets
    for n in args.batch:
        for variant in args.variants:
            ms = layer[(n, variant)]
            ratio = layer[(n, "int8")] / ms if (n, "int8") in layer else float("nan")
            print(f"int4-kernel-layer n={n} variant={variant} ms={ms:.3f} speedup_vs_int8={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
