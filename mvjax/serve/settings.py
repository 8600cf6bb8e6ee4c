"""The speech server's settings: limits, defaults and switches, checked once."""

from __future__ import annotations

import dataclasses
from typing import Optional

from mvjax.audio.stream import supported_formats
from mvjax.inference.options import SynthesisError, SynthesisOptions
from mvjax.serve.voices import VoiceLimits

LIBRARY = SynthesisOptions()  # the library's defaults, which the server's are
OPENAI_SAMPLE_RATE = 24000  # what OpenAI's API (and clients playing its raw pcm) assume


def default_format() -> str:
    """OpenAI's default (mp3) where this installation encodes it, else wav."""
    return "mp3" if "mp3" in supported_formats() else "wav"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    model_name: str = "metavoice-1b"
    max_batch: int = LIBRARY.batch_size  # text chunks per model batch (1: no cross-request batching)
    max_queue: int = 64  # speech requests admitted at once (waiting or running); more get 503
    batch_wait_s: float = 0.1  # a batch that is not full waits this long for more requests
    # "engine": continuous batching (max_batch slots; a request joins between decode calls of
    # engine_steps tokens); "static": batches decoded to their longest chunk.
    batching: str = LIBRARY.batching
    engine_steps: int = LIBRARY.engine_steps
    kv_pages: Optional[int] = LIBRARY.kv_pages  # the engine's KV cache as a pool of pages per device (None: blocks)
    kv_page_size: int = LIBRARY.kv_page_size
    timeout_s: float = 300.0  # a speech request's deadline
    # First-stage tokens per text chunk: a cap on the work one chunk may take (None: the block's
    # room); texts are still split into chunks at the speaking rate.
    max_new_tokens: Optional[int] = None
    max_input_chars: int = 4096  # OpenAI's limit for `input`
    max_json_bytes: int = 64 * 1024  # a JSON request body
    voice_limits: VoiceLimits = VoiceLimits()
    api_key: Optional[str] = None
    public_metrics: bool = False  # /metrics without the API key (it needs it when a key is set)
    cors_origins: tuple[str, ...] = ()
    log_text: bool = False
    log_rounds: bool = False  # one INFO line per scheduler round (chunks, tokens, stage 1 and streaming time)
    decoder: str = LIBRARY.decoder  # default decoder: mbd | encodec
    enhance: bool = LIBRARY.enhance  # DeepFilterNet3 on the output
    normalize: bool = LIBRARY.normalize  # -14 LUFS
    sample_rate: int = OPENAI_SAMPLE_RATE  # every response's rate
    response_format: str = dataclasses.field(default_factory=default_format)

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        if not 0 <= self.batch_wait_s <= 10:
            raise ValueError("batch wait must be between 0 and 10 s")
        if self.timeout_s <= 0 or self.max_input_chars < 1:
            raise ValueError("timeout and max_input_chars must be positive")
        try:  # batching, engine steps, token cap and decoder: the library's checks
            self.options
        except SynthesisError as exc:
            raise ValueError(str(exc)) from None
        if self.response_format not in supported_formats():
            raise ValueError(f"response format {self.response_format!r} is not supported here")

    @property
    def options(self) -> SynthesisOptions:
        """What the worker's scheduler runs with (requests bring their own sampling, seed and decoder)."""
        return SynthesisOptions(batch_size=self.max_batch, batching=self.batching, engine_steps=self.engine_steps,
                                kv_pages=self.kv_pages, kv_page_size=self.kv_page_size,
                                max_new_tokens=self.max_new_tokens, decoder=self.decoder, enhance=self.enhance,
                                normalize=self.normalize)

    @property
    def max_upload_body(self) -> int:
        """A multipart body: the upload limit plus room for the form's other fields."""
        return self.voice_limits.max_upload_bytes + 64 * 1024
