"""Random checkpoints in the released layouts: the one source of them for the demo, benchmarks and tests.

:func:`write_random_checkpoints` writes the five files the converter knows (``first_stage.pt``,
``second_stage.pt``, ``speaker_encoder.pt``, ``encodec_24khz-demo.th``, ``mbd_comp_8.pt``) with
the key names, nesting and value types of the released checkpoints, but tiny GPTs and
diffusion U-Nets and random weights drawn from ``numpy.random.default_rng`` (seeded,
initialised like the PyTorch modules so activations stay in range). The speaker encoder and
the 24 kHz EnCodec keep their real architectures. The BPE tokenizer (256 bytes + 256 merges) is
trained at run time on a paragraph written here, with the released split pattern. The pieces
(:func:`gpt_checkpoint` with :func:`model_args`, :func:`speaker_checkpoint`,
:func:`encodec_state`, :func:`mbd_checkpoint`) build in-memory checkpoints of any size, e.g.
the released 1.2B shape for benchmarks. No download, no file shipped, no torch.

Long because it writes five checkpoint layouts (two GPTs, the LSTM speaker encoder, the SEANet
codec, four diffusion U-Nets with their omegaconf configs); each is a short function over the
shared PyTorch-default initialisers, which splitting by component would scatter.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import regex  # tiktoken's own dependency; understands \\p{L}

from convert_weights import check_seed
from convert_weights.torch_writer import omegaconf_config, save_checkpoint
from mvjax.audio.bands import lowpass_filters

# The released tokenizers' pre-tokenisation pattern (tiktoken syntax).
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BPE_MERGES = 256
END_OF_TEXT = "<|endoftext|>"

# Vocabulary layout of the released first stage: two codebooks of 1024, end of audio, then text.
CODEBOOK = 1024
FIRST_STAGE_TEXT_OFFSET = 2 * CODEBOOK + 1  # 2049
SECOND_STAGE_TEXT_OFFSET = CODEBOOK + 1  # 1025
SPEAKER_EMB = 256

# What the model is trained on: a paragraph of ordinary English written for this module.
TRAINING_TEXT = """\
On a quiet morning at the edge of the harbour, the old lighthouse keeper opened his notebook
and began to write about the weather, the boats and the birds. He wrote that the wind had
turned to the north during the night, that the water was calm and grey, and that three
fishing boats had already left before the sun came up. Every day he counted the ships that
passed the point, and every evening he read his notes aloud to the cat, who listened with
great patience and very little interest. People in the town often asked him why he still
kept a record when nobody needed it any more. He would smile and say that a small habit,
done with care for many years, becomes a kind of company. When the storms came in winter,
he stayed awake by the lamp, watching the long waves break against the rocks, and he wrote
down the time of each strong gust. In the spring, children from the school visited the
tower. They climbed the narrow stairs, one hundred and twelve steps, and looked out over the
bright sea. Some of them wanted to know how far the light could reach; others only wanted to
see the seals sleeping on the sand below. He told them that the light could be seen from
almost twenty miles away on a clear night, and that sailors used it to find their way home.
Then he showed them the brass lens, polished and shining, and explained how it bends the
light into a single beam. Before they left, each child wrote a short sentence in his book.
It's the best page I have, he said later, because it reminds me that the work was never
really about the lamp. It was about the people who're out there, waiting for a sign that
they'll be safe, and about the ones who'd like to hear a good story when they return.
"""


# --- Tokenizer ----------------------------------------------------------------------------


def train_bpe(text: str, pat_str: str = PAT_STR, merges: int = BPE_MERGES) -> dict[bytes, int]:
    """Byte-level BPE: the 256 single bytes, then ``merges`` learned merges (tiktoken ranks).

    Pre-tokenises ``text`` with ``pat_str`` and repeatedly merges the most frequent
    adjacent pair of tokens (ties: the smallest merged bytes, then the smallest left part),
    so the result depends only on the text.
    """
    words = collections.Counter(piece.encode("utf-8") for piece in regex.findall(pat_str, text))
    corpus = [(tuple(bytes([b]) for b in word), count) for word, count in sorted(words.items())]
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < 256 + merges:
        pairs: collections.Counter = collections.Counter()
        for tokens, count in corpus:
            for pair in zip(tokens, tokens[1:]):
                pairs[pair] += count
        if not pairs:
            raise ValueError(f"the training text only supports {len(ranks) - 256} merges, {merges} asked")
        (left, right), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0][0] + kv[0][1], kv[0][0]))
        merged = left + right
        if merged not in ranks:
            ranks[merged] = len(ranks)
        new_corpus = []
        for tokens, count in corpus:
            out, i = [], 0
            while i < len(tokens):
                if i + 1 < len(tokens) and tokens[i] == left and tokens[i + 1] == right:
                    out.append(merged)
                    i += 2
                else:
                    out.append(tokens[i])
                    i += 1
            new_corpus.append((tuple(out), count))
        corpus = new_corpus
    return ranks


def tokenizer_meta(offset: int, ranks: dict[bytes, int] | None = None) -> dict:
    """``meta["tokenizer"]`` of a released GPT checkpoint, for the demo BPE."""
    ranks = train_bpe(TRAINING_TEXT) if ranks is None else ranks
    return {
        "name": f"mvjax_demo_bpe_{len(ranks)}",
        "pat_str": PAT_STR,
        "mergeable_ranks": dict(ranks),
        "special_tokens": {END_OF_TEXT: len(ranks)},
        "offset": offset,
    }


# --- Random initialisers (PyTorch defaults) -----------------------------------------------


def _uniform(rng: np.random.Generator, shape, bound: float) -> np.ndarray:
    return ((rng.random(shape, dtype=np.float32) * 2 - 1) * np.float32(bound)).astype(np.float32)


def _normal(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def component_rng(seed: int, component: int) -> np.random.Generator:
    """Independent stream per component, so each file depends only on (seed, component)."""
    return np.random.default_rng([int(seed), component])


# --- GPT stages ---------------------------------------------------------------------------


def _gpt_state(rng: np.random.Generator, args: dict, prefix: str = "") -> collections.OrderedDict:
    """The reference GPT's state dict, initialised as its ``_init_weights`` does (N(0, 0.02), scaled residual projections)."""
    d, n_layer = args["n_embd"], args["n_layer"]
    std, proj_std = 0.02, 0.02 / np.sqrt(2 * n_layer)
    swiglu = args["nonlinearity_type"] == "swiglu"
    hidden = 4 * d
    if swiglu:
        m = args["swiglu_multiple_of"]
        hidden = m * -(-int(2 * hidden / 3) // m)
    layernorm_bias = args["bias"] and args["norm_type"] == "layernorm"
    sd = collections.OrderedDict()

    def put(name, value):
        sd[prefix + name] = value

    wtes = [_normal(rng, (v, d), std) for v in args["vocab_sizes"]]
    for i, table in enumerate(wtes):
        put(f"transformer.wtes.{i}.weight", table)
    put("transformer.wpe.weight", _normal(rng, (args["block_size"], d), std))
    for layer in range(n_layer):
        h = f"transformer.h.{layer}."
        for norm in ("ln_1", "ln_2"):
            put(h + f"{norm}.weight", np.ones(d, np.float32))
            if layernorm_bias:
                put(h + f"{norm}.bias", np.zeros(d, np.float32))
        put(h + "attn.c_attn.weight", _normal(rng, (3 * d, d), std))
        if args["bias"]:
            put(h + "attn.c_attn.bias", np.zeros(3 * d, np.float32))
        put(h + "attn.c_proj.weight", _normal(rng, (d, d), proj_std))
        if args["bias"]:
            put(h + "attn.c_proj.bias", np.zeros(d, np.float32))
        ins = ("swiglu.w1", "swiglu.w3") if swiglu else ("c_fc",)
        for name in ins:
            put(h + f"mlp.{name}.weight", _normal(rng, (hidden, d), std))
            if args["bias"]:
                put(h + f"mlp.{name}.bias", np.zeros(hidden, np.float32))
        put(h + "mlp.c_proj.weight", _normal(rng, (d, hidden), proj_std))
        if args["bias"]:
            put(h + "mlp.c_proj.bias", np.zeros(d, np.float32))
    put("transformer.ln_f.weight", np.ones(d, np.float32))
    if layernorm_bias:
        put("transformer.ln_f.bias", np.zeros(d, np.float32))
    put("speaker_cond_pos.weight", _normal(rng, (d, SPEAKER_EMB), std))
    if args["target_vocab_sizes"] is None:
        for i, table in enumerate(wtes):
            put(f"lm_heads.{i}.weight", table)  # tied: the very same tensor
    else:
        for i, v in enumerate(args["target_vocab_sizes"]):
            put(f"lm_heads.{i}.weight", _normal(rng, (v, d), std))
    return sd


def model_args(**kw) -> dict:
    args = {
        "block_size": None, "vocab_sizes": None, "target_vocab_sizes": None, "n_layer": None, "n_head": None,
        "n_embd": None, "dropout": 0.0, "spkemb_dropout": 0.0, "bias": False, "causal": True,
        "spk_emb_on_text": True, "norm_type": "rmsnorm", "rmsnorm_eps": 1e-5, "nonlinearity_type": "swiglu",
        "swiglu_multiple_of": 256, "attn_kernel_type": "torch_attn", "kv_cache_enabled": False,
    }
    args.update(kw)
    return args


FIRST_STAGE_ARGS = model_args(
    block_size=2048, vocab_sizes=[2 * CODEBOOK + 1 + 512 + 1], n_layer=2, n_head=4, n_embd=64,
    causal=True, norm_type="rmsnorm", nonlinearity_type="swiglu",
)
SECOND_STAGE_ARGS = model_args(
    block_size=1024, vocab_sizes=[CODEBOOK + 1 + 512 + 1, CODEBOOK + 1], target_vocab_sizes=[CODEBOOK + 1] * 6,
    n_layer=2, n_head=2, n_embd=32, causal=False, norm_type="layernorm", nonlinearity_type="gelu",
)


def gpt_checkpoint(rng, args: dict, offset: int, ranks: dict, config: dict, prefix: str) -> dict:
    return {
        "model": _gpt_state(rng, args, prefix),
        "model_args": dict(args),
        "iter_num": 0,
        "best_val_loss": float("inf"),
        "config": config,
        "meta": {"tokenizer": tokenizer_meta(offset, ranks), "speaker_cond": True, "speaker_emb_size": SPEAKER_EMB},
    }


# --- Speaker encoder (real sizes) ---------------------------------------------------------


def speaker_checkpoint(rng, n_mels: int = 40, hidden: int = 256, layers: int = 3, embedding: int = 256) -> dict:
    state: dict = {}
    bound = 1 / np.sqrt(hidden)
    for k in range(layers):
        cin = n_mels if k == 0 else hidden
        state[f"lstm.weight_ih_l{k}"] = _uniform(rng, (4 * hidden, cin), bound)
        state[f"lstm.weight_hh_l{k}"] = _uniform(rng, (4 * hidden, hidden), bound)
        state[f"lstm.bias_ih_l{k}"] = _uniform(rng, (4 * hidden,), bound)
        state[f"lstm.bias_hh_l{k}"] = _uniform(rng, (4 * hidden,), bound)
    state["linear.weight"] = _uniform(rng, (embedding, hidden), 1 / np.sqrt(hidden))
    state["linear.bias"] = _uniform(rng, (embedding,), 1 / np.sqrt(hidden))
    # GE2E similarity scale and offset (training only), at their initial values.
    state["similarity_weight"] = np.array([10.0], np.float32)
    state["similarity_bias"] = np.array([-5.0], np.float32)
    return {"step": 0, "model_state": state, "optimizer_state": None}


# --- EnCodec 24 kHz (real architecture) ---------------------------------------------------

ENCODEC_24KHZ = dict(channels=1, n_filters=32, dimension=128, ratios=(8, 5, 4, 2), kernel=7, last_kernel=7,
                     residual_kernel=3, compress=2, lstm_layers=2, n_q=32, bins=1024)


def encodec_state(rng, channels=1, n_filters=32, dimension=128, ratios=(8, 5, 4, 2), kernel=7, last_kernel=7,
                   residual_kernel=3, compress=2, lstm_layers=2, n_q=32, bins=1024) -> collections.OrderedDict:
    """The ``encodec`` package's 24 kHz model state dict (SEANet + 32-book RVQ), weight-normed convolutions."""
    sd = collections.OrderedDict()

    def conv(prefix: str, cin: int, cout: int, k: int, transposed: bool = False):
        # torch: Conv1d weight (out, in, k), ConvTranspose1d (in, out, k); default init bound 1/sqrt(size(1) * k).
        shape = (cin, cout, k) if transposed else (cout, cin, k)
        bound = 1 / np.sqrt(shape[1] * k)
        v = _uniform(rng, shape, bound)
        name = "convtr.convtr" if transposed else "conv.conv"
        sd[f"{prefix}.{name}.bias"] = _uniform(rng, (cout,), bound)
        # weight_norm(dim=0) starts with g = ||v||, so the effective weight is v itself.
        sd[f"{prefix}.{name}.weight_g"] = np.sqrt(np.sum(np.square(v, dtype=np.float64), axis=(1, 2), keepdims=True)).astype(np.float32)
        sd[f"{prefix}.{name}.weight_v"] = v

    def resblock(prefix: str, dim: int):
        conv(f"{prefix}.block.1", dim, dim // compress, residual_kernel)
        conv(f"{prefix}.block.3", dim // compress, dim, 1)
        conv(f"{prefix}.shortcut", dim, dim, 1)

    def lstm(prefix: str, dim: int):
        bound = 1 / np.sqrt(dim)
        for k in range(lstm_layers):
            for name, shape in (("weight_ih", (4 * dim, dim)), ("weight_hh", (4 * dim, dim)),
                                ("bias_ih", (4 * dim,)), ("bias_hh", (4 * dim,))):
                sd[f"{prefix}.lstm.{name}_l{k}"] = _uniform(rng, shape, bound)

    # Encoder: conv, then per ratio (smallest first) resblock, ELU, strided conv; LSTM, ELU, conv.
    conv("encoder.model.0", channels, n_filters, kernel)
    index, mult = 1, 1
    for ratio in reversed(ratios):
        resblock(f"encoder.model.{index}", mult * n_filters)
        conv(f"encoder.model.{index + 2}", mult * n_filters, 2 * mult * n_filters, 2 * ratio)
        index, mult = index + 3, mult * 2
    lstm(f"encoder.model.{index}", mult * n_filters)
    conv(f"encoder.model.{index + 2}", mult * n_filters, dimension, last_kernel)

    for q in range(n_q):
        prefix = f"quantizer.vq.layers.{q}._codebook"
        embed = rng.standard_normal((bins, dimension), dtype=np.float32)
        sd[f"{prefix}.inited"] = np.ones(1, np.float32)
        sd[f"{prefix}.cluster_size"] = np.ones(bins, np.float32)
        sd[f"{prefix}.embed"] = embed
        sd[f"{prefix}.embed_avg"] = embed.copy()

    # Decoder: conv, LSTM, then per ratio (largest first) ELU, transposed conv, resblock; ELU, conv.
    mult = 2 ** len(ratios)
    conv("decoder.model.0", dimension, mult * n_filters, kernel)
    lstm("decoder.model.1", mult * n_filters)
    index = 2
    for ratio in ratios:
        conv(f"decoder.model.{index + 1}", mult * n_filters, mult * n_filters // 2, 2 * ratio, transposed=True)
        resblock(f"decoder.model.{index + 2}", mult * n_filters // 2)
        index, mult = index + 3, mult // 2
    conv(f"decoder.model.{index + 1}", n_filters, channels, last_kernel)
    return sd


# --- Multi-band diffusion (tiny U-Nets) ---------------------------------------------------

MBD_SAMPLE_RATE = 24000
MBD_BANDS = 4
# Per band: U-Net options that differ between bands (the rest is shared below).
_MBD_BAND_OPTIONS = [
    {"emb_all_layers": True, "processor": False, "power_std": 0.4},
    {"emb_all_layers": False, "processor": False, "power_std": 0.4},
    {"emb_all_layers": True, "processor": True, "power_std": 0.4},
    {"emb_all_layers": True, "processor": True, "power_std": 0.75},
]


def _mbd_band_cfg(band: int) -> dict:
    opts = _MBD_BAND_OPTIONS[band]
    return {
        "channels": 1,
        "sample_rate": MBD_SAMPLE_RATE,
        "solver": "diffusion",
        "diffusion_unet": {
            "hidden": 4, "depth": 2, "res_blocks": 1, "norm_groups": 4, "kernel": 8, "stride": 4, "growth": 2,
            "max_channels": 10000, "dropout": 0.0, "emb_all_layers": opts["emb_all_layers"], "bilstm": False,
            "codec_dim": ENCODEC_24KHZ["dimension"], "transformer": False, "cross_attention": False,
        },
        "processor": {"name": "multi_band_processor", "use": opts["processor"], "n_bands": 8,
                      "num_samples": 10000, "power_std": opts["power_std"]},
        "schedule": {"repartition": "power", "variable_step_batch": True, "beta_t0": 1e-5, "beta_t1": 0.029,
                     "beta_exp": 7.5, "num_steps": 1000, "variance": "beta", "clip": 5.0, "rescale": 1.0,
                     "noise_scale": 1.0},
        "filter": {"use": True, "n_bands": MBD_BANDS, "idx_band": band, "cutoffs": None},
    }


def _unet_state(rng, cfg: dict) -> collections.OrderedDict:
    """audiocraft ``DiffusionUnet`` state dict (no transformer / BLSTM), PyTorch default init."""
    u = cfg["diffusion_unet"]
    if u["transformer"] or u["bilstm"]:
        raise NotImplementedError("the demo U-Nets have neither a transformer nor a BLSTM bottleneck")
    steps = cfg["schedule"]["num_steps"]
    levels, chin, hidden = [], cfg["channels"], u["hidden"]
    for _ in range(u["depth"]):
        levels.append((chin, hidden))
        chin, hidden = hidden, min(int(hidden * u["growth"]), u["max_channels"])
    sd = collections.OrderedDict()

    def conv(name, cout, cin, k, bias=True):
        bound = 1 / np.sqrt(cin * k)
        sd[f"{name}.weight"] = _uniform(rng, (cout, cin, k), bound)
        if bias:
            sd[f"{name}.bias"] = _uniform(rng, (cout,), bound)

    def norm(name, c):
        sd[f"{name}.weight"] = np.ones(c, np.float32)
        sd[f"{name}.bias"] = np.zeros(c, np.float32)

    def res_blocks(prefix, c):
        for i in range(u["res_blocks"]):
            norm(f"{prefix}.res_blocks.{i}.norm1", c)
            conv(f"{prefix}.res_blocks.{i}.conv1", c, c, 3)
            norm(f"{prefix}.res_blocks.{i}.norm2", c)
            conv(f"{prefix}.res_blocks.{i}.conv2", c, c, 3)

    for d, (cin, cout) in enumerate(levels):
        conv(f"encoders.{d}.conv", cout, cin, u["kernel"], bias=False)
        norm(f"encoders.{d}.norm", cout)
        res_blocks(f"encoders.{d}", cout)
    for i, (cin, cout) in enumerate(reversed(levels)):
        res_blocks(f"decoders.{i}", cout)
        norm(f"decoders.{i}.norm", cout)
        # ConvTranspose1d(cout -> cin): weight (in, out, k), default bound 1/sqrt(out * k).
        sd[f"decoders.{i}.convtr.weight"] = _uniform(rng, (cout, cin, u["kernel"]), 1 / np.sqrt(cin * u["kernel"]))
    sd["embedding.weight"] = rng.standard_normal((steps, u["hidden"]), dtype=np.float32)
    if u["emb_all_layers"]:
        for d in range(1, u["depth"]):
            sd[f"embeddings.{d - 1}.weight"] = rng.standard_normal((steps, levels[d][1]), dtype=np.float32)
    if u["codec_dim"] is not None:
        conv("conv_codec", levels[-1][1], u["codec_dim"], 1)
    return sd


def _processor_state(rng, cfg: dict) -> collections.OrderedDict:
    """The band processor's running statistics (per-sub-band mean/power of the data and the targets)."""
    p = cfg["processor"]
    if not p["use"]:
        return collections.OrderedDict()
    n, count = int(p["n_bands"]), float(p["num_samples"])
    std = (0.02 + 0.08 * rng.random(n)).astype(np.float64)
    mean = 0.01 * std * rng.standard_normal(n)
    # return_sample rescales by (std / target) ** power_std: keep that factor within about 1.25x.
    target = std * np.exp(rng.uniform(-0.2, 0.2, n))
    filters, _ = lowpass_filters(n, float(cfg["sample_rate"]))
    return collections.OrderedDict([
        ("counts", np.array([count], np.float32)),
        ("sum_x", (count * mean).astype(np.float32)),
        ("sum_x2", (count * (std**2 + mean**2)).astype(np.float32)),
        ("sum_target_x2", (count * target).astype(np.float32)),
        ("split_bands.lowpass.filters", filters[:, None, :].astype(np.float32)),
    ])


def mbd_checkpoint(rng) -> dict:
    ckpt: dict = {"sample_rate": MBD_SAMPLE_RATE, "n_bands": MBD_BANDS}
    for band in range(MBD_BANDS):
        cfg = _mbd_band_cfg(band)
        ckpt[band] = {
            "cfg": omegaconf_config(cfg),
            "model_state": _unet_state(rng, cfg),
            "processor_state": _processor_state(rng, cfg),
        }
    return ckpt


# --- Writing and converting ---------------------------------------------------------------

RELEASED_FILES = {
    "first_stage": "first_stage.pt",
    "second_stage": "second_stage.pt",
    "speaker_encoder": "speaker_encoder.pt",
    "encodec": "encodec_24khz-demo.th",
    "mbd": "mbd_comp_8.pt",
}


def write_random_checkpoints(directory: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write the five demo checkpoints (released layouts, random weights) into ``directory``.

    Returns {component name: file path}. Same seed, same bytes.
    """
    seed = check_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ranks = train_bpe(TRAINING_TEXT)
    paths = {name: directory / fname for name, fname in RELEASED_FILES.items()}
    save_checkpoint(paths["first_stage"], gpt_checkpoint(
        component_rng(seed, 1), FIRST_STAGE_ARGS, FIRST_STAGE_TEXT_OFFSET, ranks,
        {"causal": True, "batch_size": 8, "learning_rate": 3e-4, "block_size": FIRST_STAGE_ARGS["block_size"]},
        prefix="_orig_mod.",  # the released first stage was saved from a torch.compile'd module
    ))
    save_checkpoint(paths["second_stage"], gpt_checkpoint(
        component_rng(seed, 2), SECOND_STAGE_ARGS, SECOND_STAGE_TEXT_OFFSET, ranks,
        {"causal": False, "batch_size": 16, "learning_rate": 3e-4, "block_size": SECOND_STAGE_ARGS["block_size"]},
        prefix="",
    ))
    save_checkpoint(paths["speaker_encoder"], speaker_checkpoint(component_rng(seed, 3)))
    save_checkpoint(paths["encodec"], encodec_state(component_rng(seed, 4), **ENCODEC_24KHZ))
    save_checkpoint(paths["mbd"], mbd_checkpoint(component_rng(seed, 5)))
    return paths
