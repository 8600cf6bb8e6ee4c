"""The multi-band diffusion decoder's configuration, frozen and checked, built from the converted
``mbd/config.json`` (itself built from each band's omegaconf config in ``mbd_comp_*.pt``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mvjax.core.errors import MvjaxError
from mvjax.nn.diffusion_unet import UnetConfig


class DiffusionConfigError(MvjaxError, ValueError):
    """A diffusion configuration with missing or ill-typed fields."""


def _number(d: Mapping, key: str, kind=float, default=None):
    if key not in d or d[key] is None:
        if default is None:
            raise DiffusionConfigError(f"diffusion config lacks {key!r}")
        return default
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DiffusionConfigError(f"diffusion config {key!r} must be a number, not {value!r}")
    return kind(value)


def _extra(d: Mapping, known: set) -> tuple:
    """Options the sampler does not use, kept (sorted) so the config round-trips."""
    return tuple(sorted((k, v) for k, v in d.items() if k not in known and isinstance(v, (str, int, float, bool, type(None)))))


@dataclasses.dataclass(frozen=True)
class NoiseScheduleConfig:
    """audiocraft's ``NoiseSchedule`` (power repartition): ``betas = linspace(b0**(1/e), b1**(1/e), N) ** e``."""

    num_steps: int
    beta_t0: float
    beta_t1: float
    beta_exp: float
    repartition: str = "power"
    noise_scale: float = 1.0
    clip: float = 0.0  # 0 = no clipping
    extra: tuple = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NoiseScheduleConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        repartition = d.get("repartition", "power")
        if repartition != "power":
            raise DiffusionConfigError(f"noise schedule {repartition!r} is not supported (only 'power')")
        steps = _number(d, "num_steps", int)
        if steps < 2:
            raise DiffusionConfigError(f"num_steps must be >= 2, not {steps}")
        return cls(num_steps=steps, beta_t0=_number(d, "beta_t0"), beta_t1=_number(d, "beta_t1"),
                   beta_exp=_number(d, "beta_exp"), repartition=repartition,
                   noise_scale=_number(d, "noise_scale", default=1.0), clip=_number(d, "clip", default=0.0),
                   extra=_extra(d, known))

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **dict(self.extra)}


@dataclasses.dataclass(frozen=True)
class BandProcessorConfig:
    """The band processor of one diffusion band (audiocraft's ``MultiBandProcessor``): when ``use``,
    the sample is rescaled per ``n_bands`` mel band with stored statistics."""

    use: bool = False
    n_bands: int = 8
    power_std: float = 1.0
    extra: tuple = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BandProcessorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        use = bool(d.get("use", False))
        n_bands = _number(d, "n_bands", int, default=8)
        if use and n_bands < 1:
            raise DiffusionConfigError(f"processor n_bands must be >= 1, not {n_bands}")
        return cls(use=use, n_bands=n_bands, power_std=_number(d, "power_std", default=1.0), extra=_extra(d, known))

    def to_dict(self) -> dict:
        return {"use": self.use, "n_bands": self.n_bands, "power_std": self.power_std, **dict(self.extra)}


@dataclasses.dataclass(frozen=True)
class DiffusionBandConfig:
    unet: UnetConfig
    schedule: NoiseScheduleConfig
    processor: BandProcessorConfig


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Every band of the decoder (they may differ in architecture) and the waveform rate."""

    sample_rate: int
    bands: tuple[DiffusionBandConfig, ...]

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiffusionConfig":
        """From ``{sample_rate, n_bands, bands: [{unet, schedule, processor}]}`` (the converted layout)."""
        if not isinstance(d, Mapping) or not isinstance(d.get("bands"), list) or not d["bands"]:
            raise DiffusionConfigError("diffusion config has no bands")
        if "n_bands" in d and int(d["n_bands"]) != len(d["bands"]):
            raise DiffusionConfigError(f"diffusion config says {d['n_bands']} bands but lists {len(d['bands'])}")
        bands = []
        for b, band in enumerate(d["bands"]):
            try:
                unet = band["unet"] if isinstance(band["unet"], UnetConfig) else UnetConfig(**band["unet"])
                bands.append(DiffusionBandConfig(unet, NoiseScheduleConfig.from_dict(band["schedule"]),
                                                 BandProcessorConfig.from_dict(band.get("processor") or {})))
            except (KeyError, TypeError) as exc:
                raise DiffusionConfigError(f"diffusion band {b}: {exc}") from None
        return cls(sample_rate=_number(d, "sample_rate", int, default=24000), bands=tuple(bands))

    def to_dict(self) -> dict:
        return {"sample_rate": self.sample_rate, "n_bands": self.n_bands,
                "bands": [{"unet": dataclasses.asdict(b.unet), "schedule": b.schedule.to_dict(),
                           "processor": b.processor.to_dict()} for b in self.bands]}
