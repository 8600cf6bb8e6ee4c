"""A PyTorch-compatible LSTM layer (gate order i, f, g, o; two biases), time-major."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lstm_layer(p, inputs):
    """One unidirectional layer from zero state.

    p: ``w_ih`` (in, 4H), ``w_hh`` (H, 4H), ``b_ih`` (4H,), ``b_hh`` (4H,).
    inputs (T, B, in) -> outputs (T, B, H).
    """
    return lstm_scan(p, inputs)[0]


def lstm_scan(p, inputs, state=None):
    """One layer from ``state`` ((h, c), each (B, H); zeros when None): -> (outputs (T, B, H), final (h, c))."""
    hidden = p["w_hh"].shape[0]
    projected = jnp.einsum("tbi,ig->tbg", inputs, p["w_ih"]) + p["b_ih"]  # every step at once

    def step(carry, x_t):
        h, c = carry
        gates = x_t + h @ p["w_hh"] + p["b_hh"]
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    if state is None:
        zeros = jnp.zeros((inputs.shape[1], hidden), inputs.dtype)
        state = (zeros, zeros)
    final, outputs = jax.lax.scan(step, state, projected)
    return outputs, final


def lstm_shapes(input_size: int, hidden: int) -> dict:
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return {"w_ih": spec(input_size, 4 * hidden), "w_hh": spec(hidden, 4 * hidden), "b_ih": spec(4 * hidden), "b_hh": spec(4 * hidden)}
