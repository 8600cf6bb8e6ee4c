"""Converting the released PyTorch checkpoints into mvjax's model format (``python -m convert_weights``).

The runtime reaches this package only through its entry points: :func:`convert_released` and
:func:`released_components` (model sources), :func:`write_random_released` and :func:`check_seed` (the
demo model), :func:`write_released_gpt` (fine-tuning export); everything else here (the restricted
unpickler, the mapping tables, the torch-free ``.pt`` writer, random released-layout checkpoints) is for
the converter itself, its CLI, the benchmarks and the tests. The entry points import their modules
on first call, so importing the package (``python -m convert_weights``, :mod:`mvjax.sources`) stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def released_components(source: str | Path) -> dict:
    """The released checkpoints found in ``source``: {component name: file path}."""
    # lazy: keeps importing the package cheap (see the module docstring)
    from convert_weights.convert import find_components

    return find_components(Path(source))


def convert_released(source: str | Path, out: str | Path, log: Callable[[str], None] = print) -> None:
    """Convert every released checkpoint in ``source`` into a model directory ``out`` (atomically)."""
    # lazy: keeps importing the package cheap (see the module docstring)
    from convert_weights.convert import convert_directory

    convert_directory(Path(source), Path(out), log=log)


def write_released_gpt(path: str | Path, config, params, tokenizer_spec, extra_config: dict | None = None,
                       **kwargs) -> Path:
    """Write a GPT parameter tree (float, converted layout) as a released-layout checkpoint at ``path``
    (``first_stage.pt`` that the reference code loads), atomically; see :mod:`convert_weights.export`."""
    # lazy: keeps importing the package cheap (see the module docstring)
    from convert_weights.export import write_released_gpt as write

    return write(path, config, params, tokenizer_spec, extra_config, **kwargs)


def write_random_released(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the demo model's five checkpoints (released layouts, random weights) into ``directory``:
    {component name: file path}; see :mod:`convert_weights.random_checkpoints`."""
    # cycle: random_checkpoints imports check_seed from here; lazy too (see the module docstring)
    from convert_weights.random_checkpoints import write_random_checkpoints

    return write_random_checkpoints(directory, seed)


def check_seed(seed) -> int:
    """A seed as a non-negative int (ValueError otherwise)."""
    # lazy: keeps importing the package cheap (see the module docstring)
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
