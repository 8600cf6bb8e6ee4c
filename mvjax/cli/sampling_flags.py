"""Command-line flags more than one command takes."""

from __future__ import annotations

from mvjax.inference.options import SamplingConfig, SynthesisOptions


def add_sampling_flags(group, seed_help: str = "sampling seed (same seed, same tokens)") -> None:
    """The sampling flags synthesize and the dataset job share: --seed, the first stage's temperature,
    top-p and guidance scale (ranges from :class:`SamplingConfig`), the second stage's temperature and top-k."""
    group.add_argument("--seed", type=int, default=0, help=seed_help)
    for name in ("temperature", "top_p", "guidance_scale"):
        spec = SamplingConfig.spec(name)
        group.add_argument("--" + name.replace("_", "-"), type=float, default=spec.default,
                           help=f"{spec.help} (default {spec.default}; {spec.low:g} to {spec.high:g})")
    defaults = SynthesisOptions()
    group.add_argument("--stage2-temperature", type=float, default=defaults.stage2_temperature,
                       help=f"second stage; 0 = greedy (default {defaults.stage2_temperature}, which the reference's "
                            "synthesis always uses)")
    group.add_argument("--stage2-top-k", type=int, default=defaults.stage2_top_k,
                       help=f"second stage top-k (default {defaults.stage2_top_k}; 0 = off)")
