"""Per-device memory of the training state by fsdp degree, from shapes and the sharding rule alone.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m benchmarks.fsdp_memory [--config released]

For each K in ``--fsdp`` (default 1 2 4), a :class:`mvjax.train.trainer.Trainer` is built on
*abstract* weights (no memory allocated) over a ``(data, fsdp)`` mesh of K devices, and the bytes
one device holds are summed from each array's shard shape (:mod:`mvjax.train.sharding`): weights
(frozen + trainable, float32), gradients (as the trainable weights) and AdamW's two moments.
Activations are not counted (they depend on batch, window and rematerialisation). Modes: ``full``
(every block and the final norm train), ``last-block`` (the reference recipe), ``lora`` (rank 8 on
every block's attention and MLP). One line per (mode, K)::

    fsdp-memory config=released mode=full fsdp=4 weights_gib=... grads_gib=... opt_gib=... total_gib=...
"""

from __future__ import annotations

import argparse
import sys

import jax

from benchmarks.common import FIRST_STAGE_SHAPES
from benchmarks.decode import make_config
from mvjax.nn.gpt import abstract_params
from mvjax.train.model import TrainSpec
from mvjax.train.optim import OptimConfig
from mvjax.train.sharding import training_mesh
from mvjax.train.trainer import Trainer

GIB = float(1 << 30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=list(FIRST_STAGE_SHAPES), default="released")
    parser.add_argument("--fsdp", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    config = make_config("full" if args.config == "released" else args.config)
    params = abstract_params(config)
    modes = {"full": TrainSpec(last_n_blocks=config.n_layer), "last-block": TrainSpec(last_n_blocks=1),
             "lora": TrainSpec(last_n_blocks=0, lora_rank=8)}
    for mode, spec in modes.items():
        for k in args.fsdp:
            if jax.device_count() < k:
                print(f"fsdp {k} needs {k} devices (XLA_FLAGS=--xla_force_host_platform_device_count={k} on a CPU)",
                      file=sys.stderr)
                return 1
            mesh = training_mesh(k, jax.devices()[:k])
            b = Trainer(config, params, spec, OptimConfig(), 2048, mesh=mesh).bytes_per_device()
            weights = b["frozen"] + b["trainable"]
            total = weights + b["grads"] + b["opt_state"]
            print(f"fsdp-memory config={args.config} mode={mode} fsdp={k} weights_gib={weights / GIB:.2f} "
                  f"grads_gib={b['grads'] / GIB:.2f} opt_gib={b['opt_state'] / GIB:.2f} total_gib={total / GIB:.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
