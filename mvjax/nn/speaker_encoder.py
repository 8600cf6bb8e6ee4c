"""The speaker encoder: power mel partials -> stacked LSTM -> Linear -> ReLU -> L2 norm.

Parameters (converted from ``speaker_encoder.pt``; sizes read from it)::

    lstm_{k}/w_ih (in, 4H), lstm_{k}/w_hh (H, 4H), lstm_{k}/b_ih (4H,), lstm_{k}/b_hh (4H,)
    linear/kernel (H, E), linear/bias (E,)

Gate order along 4H is PyTorch's: input, forget, cell, output. The embedding of a partial
is the last layer's final hidden state through the linear layer, ReLU and L2 normalisation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mvjax.nn.lstm import lstm_layer, lstm_shapes


@dataclasses.dataclass(frozen=True)
class SpeakerEncoderConfig:
    num_layers: int
    input_size: int  # mel channels
    hidden_size: int
    embedding_size: int
    # Signal processing of the reference implementation (not stored in the checkpoint).
    sample_rate: int = 16000
    n_fft: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms
    partial_frames: int = 160
    partial_rate: float = 1.3
    min_coverage: float = 0.75
    trim_top_db: float = 20.0

    @classmethod
    def from_dict(cls, d) -> "SpeakerEncoderConfig":
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def abstract_params(cfg: SpeakerEncoderConfig) -> dict:
    """Shapes of the parameter tree (``jax.ShapeDtypeStruct`` leaves)."""
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    h = cfg.hidden_size
    tree = {f"lstm_{k}": lstm_shapes(cfg.input_size if k == 0 else h, h) for k in range(cfg.num_layers)}
    tree["linear"] = {"kernel": spec(h, cfg.embedding_size), "bias": spec(cfg.embedding_size)}
    return tree


@jax.jit
def embed_partials(params, mels):
    """mels (P, frames, mel) -> unit-norm partial embeddings (P, E)."""
    x = jnp.swapaxes(mels.astype(jnp.float32), 0, 1)  # (T, P, mel)
    k = 0
    while f"lstm_{k}" in params:
        x = lstm_layer(params[f"lstm_{k}"], x)
        k += 1
    last = x[-1]  # final hidden state of the last layer
    raw = jax.nn.relu(last @ params["linear"]["kernel"] + params["linear"]["bias"])
    return raw / jnp.linalg.norm(raw, axis=-1, keepdims=True)
