"""Text normalisation, the checkpoint's BPE tokenizer, and token-stream adapters.

The tokenizer is rebuilt from the checkpoint's ``meta["tokenizer"]`` (a tiktoken
layout: regex, 512 mergeable ranks, ``<|endoftext|>``) and shifts every id by the
stage's offset; each encoding ends with the end-of-text id.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import tiktoken

from mvjax.core.errors import MvjaxError

# Code point -> replacement, as in the reference normaliser. (Its "TM" entry is keyed
# by the decimal number 2122, not U+2122; kept as is for identical behaviour.)
_UNICODE_REPLACEMENTS: dict[int, str] = {
    8175: "'", 8189: "'", 8190: "'",
    8208: "-", 8209: "-", 8210: "-", 8211: "-", 8212: "-", 8213: "-",
    8214: "||", 8216: "'", 8217: "'", 8218: ",", 8219: "`",
    8220: '"', 8221: '"', 8222: ",,", 8223: '"',
    8228: ".", 8229: "..", 8230: "...",
    8242: "'", 8243: '"', 8245: "'", 8246: '"',
    180: "'", 2122: "TM",
}

_MULTI_SPACE = re.compile(r"\s\s+")
# C0 controls other than tab, newline and carriage return (folded into spaces), DEL and C1 controls
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class TextError(MvjaxError, ValueError):
    """Text the model cannot read."""


def _listed(chars) -> str:
    return ", ".join(f"{c!r} (U+{ord(c):04X})" for c in sorted(set(chars)))


def normalize_text(text: str) -> str:
    """Map typographic punctuation to ASCII, refuse characters outside Latin-1 and control
    characters (NUL, escape, ...: tab, newline and carriage return are whitespace), fold whitespace."""
    text = text.translate(_UNICODE_REPLACEMENTS)
    bad = [c for c in text if ord(c) >= 256]
    if bad:
        raise TextError(f"unsupported character(s) in text: {_listed(bad)}; only Latin-1 (code points < 256) "
                        "can be spoken")
    controls = _CONTROL.findall(text)
    if controls:
        raise TextError(f"unsupported control character(s) in text: {_listed(controls)}; of those only tab, "
                        "newline and carriage return are accepted")
    for ch in "\t\n\r*":
        text = text.replace(ch, " ")
    return _MULTI_SPACE.sub(" ", text.strip())


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to rebuild a stage's tokenizer; JSON-serialisable."""

    name: str
    pat_str: str
    mergeable_ranks: Mapping[bytes, int]
    special_tokens: Mapping[str, int]
    offset: int

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "TokenizerSpec":
        missing = [k for k in ("name", "pat_str", "mergeable_ranks", "special_tokens") if k not in meta]
        if missing:
            raise TextError(f"tokenizer metadata lacks {', '.join(missing)}")
        ranks = {bytes(k): int(v) for k, v in meta["mergeable_ranks"].items()}
        offset = meta.get("offset")
        return cls(
            name=str(meta["name"]),
            pat_str=str(meta["pat_str"]),
            mergeable_ranks=ranks,
            special_tokens={str(k): int(v) for k, v in meta["special_tokens"].items()},
            offset=0 if offset is None else int(offset),
        )

    def to_json(self) -> str:
        ranks = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        doc = {
            "name": self.name,
            "pat_str": self.pat_str,
            "offset": self.offset,
            "special_tokens": dict(sorted(self.special_tokens.items())),
            "mergeable_ranks": [[base64.b64encode(k).decode("ascii"), v] for k, v in ranks],
        }
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> "TokenizerSpec":
        doc = json.loads(Path(path).read_text())
        return cls(
            name=doc["name"],
            pat_str=doc["pat_str"],
            mergeable_ranks={base64.b64decode(k): int(v) for k, v in doc["mergeable_ranks"]},
            special_tokens={k: int(v) for k, v in doc["special_tokens"].items()},
            offset=int(doc["offset"]),
        )


class Tokenizer:
    """BPE tokenizer of one stage: ``encode`` gives model ids (offset added, end-of-text last)."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self._enc = tiktoken.Encoding(
            name=spec.name,
            pat_str=spec.pat_str,
            mergeable_ranks=dict(spec.mergeable_ranks),
            special_tokens=dict(spec.special_tokens),
        )

    @property
    def offset(self) -> int:
        return self.spec.offset

    @property
    def eot_token(self) -> int:
        return self._enc.eot_token + self.offset

    def encode(self, text: str) -> list[int]:
        """Encode already-normalised text; special-token strings in it are refused, as in the reference."""
        try:
            ids = self._enc.encode(text)
        except ValueError as exc:
            raise TextError(f"text contains a special token string: {exc}".splitlines()[0]) from None
        return [t + self.offset for t in ids] + [self.eot_token]

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(t) - self.offset for t in ids])
