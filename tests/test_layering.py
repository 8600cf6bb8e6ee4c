"""The package layers the README's "Layout" section states: every import (inside functions too)
goes to the same package or a layer below, and the runtime reaches the converter only through
``convert_weights``' named entry points (model sources convert, the demo writes random checkpoints,
fine-tuning exports)."""

import ast
from pathlib import Path

from tests.conftest import REPO

# Lower number = lower layer. A package may import itself and anything strictly below it.
LAYERS = {
    "mvjax.core": 0,
    "mvjax.kernels": 1,
    "mvjax.text": 1,
    "mvjax.nn": 2,
    "mvjax.audio": 2,
    "mvjax.io": 3,
    "convert_weights": 4,
    "mvjax.sources": 5,
    "mvjax.inference": 6,
    "mvjax.train": 7,
    "mvjax.serve": 7,  # beside train: neither imports the other
    # the dataset job (python -m mvjax.batch): above serve, whose voice directory it reads; beside parity
    "mvjax.batchjob": 8,
    "mvjax.parity": 8,  # the parity checks, beside the dataset job: neither imports the other nor the CLI
    "mvjax.cli": 9,
    "mvjax": 10,  # the package face (public API) and the python -m entry points
    "mvjax.serve.__main__": 10,  # python -m mvjax.serve: calls the command in mvjax.cli.serve
    "mvjax.parity.__main__": 10,  # python -m mvjax.parity: the command, on mvjax.cli.common's helpers
}
ENTRY_POINT = {"convert_released", "released_components", "write_released_gpt", "write_random_released", "check_seed"}
# The runtime layers that may reach the converter, and the entry points each may call.
CONVERTER_USERS = {
    # converting released checkpoints; the demo model's random ones
    "mvjax.sources": {"convert_released", "released_components", "write_random_released", "check_seed"},
    "mvjax.train": {"write_released_gpt"},  # exporting a fine-tuned first stage in the released layout
}


def _package(module: str) -> str:
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    raise AssertionError(f"{module} belongs to no layer")


def _modules():
    for root in ("mvjax", "convert_weights"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _imports(path: Path):
    """(imported module, names) for every import statement, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, tuple(a.name for a in node.names)


def test_every_import_goes_down_the_layers():
    problems = []
    for module, path in _modules():
        own = _package(module)
        for target, names in _imports(path):
            if not target.startswith(("mvjax", "convert_weights")):
                continue
            if target == "mvjax" and names:  # from mvjax import sub: the submodules named
                targets = [f"mvjax.{n}" for n in names]
            elif target == "convert_weights" and names and not set(names) <= ENTRY_POINT:
                targets = [f"convert_weights.{n}" for n in names]
            else:
                targets = [target]
            for t in targets:
                other = _package(t)
                if other == own:
                    continue
                if LAYERS[other] >= LAYERS[own]:
                    problems.append(f"{module} imports {t} ({own} may only import layers below it)")
    assert not problems, "\n".join(problems)


def test_runtime_reaches_the_converter_only_through_its_entry_point():
    problems = []
    for module, path in _modules():
        if not module.startswith("mvjax") or _package(module) in ("mvjax.cli", "mvjax.parity", "mvjax"):
            continue
        for target, names in _imports(path):
            if not target.startswith("convert_weights"):
                continue
            allowed = CONVERTER_USERS.get(_package(module), set())
            if target != "convert_weights" or not names or not set(names) <= allowed:
                problems.append(f"{module} imports {target} {names}")
    assert not problems, "\n".join(problems)


def test_no_module_is_too_long_without_saying_why():
    """~400 lines at most, unless the module docstring says why it is longer."""
    long = []
    for module, path in _modules():
        lines = path.read_text().count("\n")
        if lines > 420:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if "long because" not in doc.lower():
                long.append(f"{module}: {lines} lines")
    assert not long, "\n".join(long)


# Inside mvjax.inference, the path of a text: the options and the stage objects, the scheduler that
# runs chunks through them, and the TTS object on top that loads a model and wires it.
INFERENCE_ORDER = ["options", "stages", "scheduler", "streaming", "pipeline"]
# The server reaches inference here (longform: where sentences end, for text that arrives in pieces).
SERVE_MAY_USE = {"mvjax.inference.options", "mvjax.inference.scheduler", "mvjax.inference.longform"}


def _inference_imports(path: Path) -> set[str]:
    return {t for t, _ in _imports(path) if t.startswith("mvjax.inference.")}


def test_the_scheduler_sits_between_the_stages_and_the_pipeline():
    """stages -> scheduler -> pipeline, never back up; the server reaches inference only through
    the scheduler and the options; the TTS module stays a wiring module (<= 300 lines)."""
    problems = []
    for i, name in enumerate(INFERENCE_ORDER):
        path = REPO / "mvjax" / "inference" / f"{name}.py"
        above = {f"mvjax.inference.{n}" for n in INFERENCE_ORDER[i + 1:]}
        problems += [f"mvjax.inference.{name} imports {t}" for t in _inference_imports(path) & above]
    for module, path in _modules():
        if module.startswith("mvjax.inference.") and module.rsplit(".", 1)[1] not in INFERENCE_ORDER:
            problems += [f"{module} imports {t}" for t in _inference_imports(path)
                         if t.rsplit(".", 1)[1] in ("scheduler", "pipeline")]
    serve = set().union(*(_inference_imports(p) for m, p in _modules() if m.startswith("mvjax.serve")))
    assert serve <= SERVE_MAY_USE and len(serve) <= 3, serve
    assert not problems, "\n".join(problems)
    assert (REPO / "mvjax" / "inference" / "pipeline.py").read_text().count("\n") <= 300


def test_stage_and_scheduler_functions_take_few_arguments():
    """No function of the stage objects or the scheduler takes more than six arguments (self aside):
    what travels together is a record (options, a chunk, a batcher)."""
    many = []
    for name in ("stages", "scheduler"):
        tree = ast.parse((REPO / "mvjax" / "inference" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
                if len(names) > 6:
                    many.append(f"{name}.{node.name}: {len(names)} arguments")
    assert not many, "\n".join(many)
