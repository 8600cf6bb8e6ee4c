"""Finding a model: converted directories, released checkpoint directories, hub repo ids.

:func:`resolve_model` turns what a user passes as ``--model`` into a converted model
directory:

- a converted directory (it has ``manifest.json``) is used as is;
- a directory of released checkpoints (``first_stage.pt``, ``second_stage.pt``,
  ``speaker_encoder.pt``, ``encodec_24khz-*.th``, ``mbd_comp_*.pt``) is converted once into
  the cache (``$MVJAX_CACHE`` or ``~/.cache/mvjax``, under ``converted/<digest>``), keyed by the
  files' names and contents: moving, copying or touching them reuses the conversion, editing one
  makes a new one. Nothing is deleted automatically; ``rm -rf ~/.cache/mvjax/converted`` (or
  ``$MVJAX_CACHE/converted``) frees the space, and the next run converts again;
- a Hugging Face repo id (``metavoiceio/metavoice-1B-v0.1``) is downloaded with
  ``huggingface_hub`` together with the diffusion decoder (``facebook/multiband-diffusion``,
  ``mbd_comp_8.pt``) and the EnCodec 24 kHz codec from its published URL, then converted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from convert_weights import convert_released, released_components
from mvjax.core.atomic import atomic_path, write_bytes
from mvjax.core.paths import cache_root
from mvjax.io.checkpoint import MANIFEST, ModelDirError

DEFAULT_REPO = "metavoiceio/metavoice-1B-v0.1"
METAVOICE_FILES = ("first_stage.pt", "second_stage.pt", "speaker_encoder.pt")
MBD_REPO, MBD_FILE = "facebook/multiband-diffusion", "mbd_comp_8.pt"
ENCODEC_URL = "https://dl.fbaipublicfiles.com/encodec/v0/encodec_24khz-d7cc33bc.th"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _file_digest(path: Path, index: dict) -> str:
    """sha256 of a file's bytes, remembered in ``index`` under its (real path, size, mtime, inode)
    so an unchanged file is hashed once (~3 s for the 5 GB of released checkpoints)."""
    real = path.resolve()
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if key not in index:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        index[key] = h.hexdigest()
    return index[key]


def _fingerprint(files: list[Path], root: Path) -> str:
    """A key for a set of released checkpoints from their names and contents only: the same files
    copied, moved or touched map to the same converted model; an edited file to a new one."""
    index_path = root / "converted" / "digests.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f"{f.name}\0{_file_digest(f, index)}\n".encode())
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(index_path, json.dumps(index, indent=0, sort_keys=True).encode())
    except OSError:  # a read-only cache only costs re-hashing next time
        pass
    return h.hexdigest()[:20]


def convert_cached(source: Path, root: Optional[Path] = None, log_fn: Callable[[str], None] = print) -> Path:
    """Convert the released checkpoints in ``source`` into the cache once; return the converted directory."""
    found = released_components(source)
    if not found:
        raise ModelDirError(
            f"{source} is neither a converted model (no {MANIFEST}) nor a directory of released checkpoints "
            "(first_stage.pt, second_stage.pt, speaker_encoder.pt, encodec_24khz-*.th, mbd_comp_*.pt)"
        )
    base = cache_root(root)
    out = base / "converted" / _fingerprint(list(found.values()), base)
    if (out / MANIFEST).is_file():
        return out
    log_fn(f"converting {source} into {out} (once)")
    convert_released(source, out, log=log_fn)
    return out


def download_released(repo_id: str, root: Optional[Path] = None, log_fn: Callable[[str], None] = print) -> Path:
    """Fetch the released checkpoints of ``repo_id`` plus the diffusion and codec weights; returns a
    directory holding (links to) all of them."""
    try:
        from huggingface_hub import hf_hub_download  # optional: only hub ids need it
    except ImportError:
        raise ModelDirError(
            f"{repo_id!r} is not a local directory; downloading it needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    target = cache_root(root) / "released" / repo_id.replace("/", "--")
    target.mkdir(parents=True, exist_ok=True)
    wanted = [(repo_id, name) for name in METAVOICE_FILES] + [(MBD_REPO, MBD_FILE)]
    try:
        for repo, name in wanted:
            log_fn(f"fetching {repo}/{name}")
            _link(Path(hf_hub_download(repo_id=repo, filename=name)), target / name)
    except Exception as exc:  # network, auth, missing repo: one line for the user
        raise ModelDirError(f"cannot download {repo}/{name} from the Hugging Face hub ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); download the files yourself "
                            "and pass their directory (see README)") from None
    codec = target / Path(ENCODEC_URL).name
    if not codec.is_file():
        log_fn(f"fetching {ENCODEC_URL}")
        try:
            with atomic_path(codec) as tmp, open(tmp, "wb") as f, urllib.request.urlopen(ENCODEC_URL, timeout=60) as r:
                while block := r.read(1 << 20):
                    f.write(block)
        except (OSError, urllib.error.URLError) as exc:
            raise ModelDirError(f"cannot download {ENCODEC_URL} ({exc}); download it yourself into a model directory "
                                "with the other checkpoints (see README)") from None
    return target


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        if dst.resolve() == src.resolve():
            return
        dst.unlink()
    dst.symlink_to(src)


def resolve_model(model: str | os.PathLike, cache_root: Optional[str | os.PathLike] = None,
                  log_fn: Callable[[str], None] = print) -> Path:
    """A converted model directory for ``model`` (converted dir, released dir or hub repo id)."""
    root = None if cache_root is None else Path(cache_root)
    path = Path(model)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return path
        return convert_cached(path, root, log_fn)
    if path.exists():
        raise ModelDirError(f"--model must be a directory or a hub repo id, got the file {path}")
    text = str(model)
    if _REPO_ID.match(text) and not text.startswith((".", "/", "~")):
        return convert_cached(download_released(text, root, log_fn), root, log_fn)
    raise ModelDirError(f"model directory not found: {path}")
