"""Our GPT against a PyTorch twin of the reference, over the config space both stages use."""

import numpy as np
import pytest
import torch

from convert_weights.convert import convert_directory
from mvjax.io.checkpoint import load_gpt_stage
from mvjax.nn.gpt import forward
from tests.torch_twin import model_args, save_checkpoint

VARIANTS = {
    "first-stage-like": dict(),
    "rmsnorm-swiglu-bias": dict(bias=True),
    "layernorm-gelu-noncausal": dict(
        causal=False, norm_type="layernorm", nonlinearity_type="gelu", vocab_sizes=[40, 33], target_vocab_sizes=[33, 33, 33]
    ),
    "layernorm-bias-gelu-noncausal": dict(
        causal=False, bias=True, norm_type="layernorm", nonlinearity_type="gelu", vocab_sizes=[40, 33], target_vocab_sizes=[33]
    ),
    "layernorm-bias-swiglu-causal": dict(bias=True, norm_type="layernorm", n_head=4, n_layer=3),
    "speaker-masked-before-eot": dict(spk_emb_on_text=False, vocab_sizes=[1600]),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matches_torch_twin(name, tmp_path):
    args = model_args(**VARIANTS[name])
    (tmp_path / "src").mkdir()
    fname = "first_stage.pt" if args["causal"] else "second_stage.pt"
    twin = save_checkpoint(tmp_path / "src" / fname, args, seed=3)
    convert_directory(tmp_path / "src", tmp_path / "out")
    config, params, _ = load_gpt_stage(tmp_path / "out", fname[:-3])

    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, v, size=(2, 20)) for v in args["vocab_sizes"]], axis=1)
    if not args["spk_emb_on_text"]:
        idx[0, 0, 7] = 1537  # the end-of-text marker the reference masks the speaker before
        idx[1, 0, 12] = 1537
    spk = rng.standard_normal((2, 8)).astype(np.float32)
    with torch.no_grad():
        ref_c = [x.numpy() for x in twin(torch.from_numpy(idx), torch.from_numpy(spk))]
        ref_u = [x.numpy() for x in twin(torch.from_numpy(idx))]
    got_c = forward(config, params, idx, spk)
    got_u = forward(config, params, idx, None)
    assert len(got_c) == len(ref_c)
    for g, r in zip(list(got_c) + list(got_u), ref_c + ref_u):
        np.testing.assert_allclose(np.asarray(g), r, atol=2e-5 * max(1.0, np.abs(r).max()), rtol=0)
    # The speaker conditioning must matter, or the cond/uncond comparison proves nothing.
    assert np.abs(np.asarray(got_c[0]) - np.asarray(got_u[0])).max() > 1e-3


def test_causal_logits_do_not_see_the_future(converted):
    config, params, _ = load_gpt_stage(converted, "first_stage")
    rng = np.random.default_rng(1)
    idx = rng.integers(0, config.vocab_sizes[0], size=(1, 1, 24))
    changed = idx.copy()
    changed[..., 15:] = (changed[..., 15:] + 1) % config.vocab_sizes[0]
    a = np.asarray(forward(config, params, idx)[0])
    b = np.asarray(forward(config, params, changed)[0])
    np.testing.assert_array_equal(a[:, :15], b[:, :15])
    assert np.abs(a[:, 15:] - b[:, 15:]).max() > 1e-4


def test_sequence_longer_than_block_is_refused(converted):
    config, params, _ = load_gpt_stage(converted, "second_stage")
    idx = np.zeros((1, 2, config.block_size + 1), np.int64)
    with pytest.raises(ValueError, match="block size"):
        forward(config, params, idx)
