"""DistillConfig: defaults, one-line errors naming field / value / range, from_dict / to_dict, presets."""

import dataclasses
import math

import pytest

from sinkd_ray.config import DistillConfig
from sinkd_ray.errors import SinkdError


def test_defaults_are_the_papers_setting():
    cfg = DistillConfig()
    assert (cfg.alpha, cfg.beta, cfg.tau_kl, cfg.tau_sd) == (0.9, 0.8, 1.0, 2.0)
    assert (cfg.sinkhorn_lambda, cfg.sinkhorn_iters, cfg.sinkhorn_p, cfg.batch_size) == (0.1, 20, 1.0, 32)
    assert (cfg.sinkhorn_variant, cfg.distribution_term, cfg.sinkhorn_mass, cfg.sinkhorn_grad) == (
        "batch",
        "sinkhorn",
        "unit",
        "unrolled",
    )
    assert cfg.use_ce and cfg.use_kl and not cfg.kl_tau_squared and cfg.sinkhorn_scale == 1.0  # Eq. 19: no τ²


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("alpha", 1.5, "alpha=1.5 is outside [0, 1]"),
        ("alpha", -0.1, "alpha=-0.1 is outside [0, 1]"),
        ("alpha", math.nan, "alpha=nan is outside [0, 1]"),
        ("alpha", "0.9", "alpha='0.9' must be a number in [0, 1]"),
        ("beta", -1, "beta=-1 is outside [0, inf)"),
        ("tau_kl", 0, "tau_kl=0 is outside (0, inf)"),
        ("tau_sd", -2.0, "tau_sd=-2.0 is outside (0, inf)"),
        ("sinkhorn_lambda", 0.0, "sinkhorn_lambda=0.0 is outside (0, inf)"),
        ("sinkhorn_iters", 0, "sinkhorn_iters=0 is outside [1, inf)"),
        ("sinkhorn_iters", 2.5, "sinkhorn_iters=2.5 must be an integer in [1, inf)"),
        ("sinkhorn_iters", math.inf, "sinkhorn_iters=inf must be an integer in [1, inf)"),
        ("sinkhorn_p", 0.5, "sinkhorn_p=0.5 is outside [1, inf)"),
        ("sinkhorn_p", math.inf, "sinkhorn_p=inf is outside [1, inf)"),
        ("batch_size", 1, "batch_size=1 is outside [2, inf)"),
        ("batch_size", True, "batch_size=True must be an integer in [2, inf)"),
        (
            "sinkhorn_variant",
            "rows",
            "sinkhorn_variant='rows' is not one of ['batch', 'sample', 'sample_uniform', 'flat']",
        ),
        ("distribution_term", "kl", "distribution_term='kl' is not one of ['sinkhorn', 'rkl', 'js', 'tvd', 'none']"),
        ("sinkhorn_mass", "total", "sinkhorn_mass='total' is not one of ['unit', 'batch']"),
        ("sinkhorn_grad", "implicit", "sinkhorn_grad='implicit' is not one of ['unrolled', 'envelope']"),
        ("sinkhorn_scale_preset", "paper", "sinkhorn_scale_preset='paper' is not one of [None, 'unit', 'released']"),
        ("sinkhorn_scale", 0.0, "sinkhorn_scale=0.0 is outside (0, inf)"),
        ("use_ce", "yes", "use_ce='yes' must be true or false"),
        ("kl_tau_squared", 1, "kl_tau_squared=1 must be true or false"),
        ("sinkhorn_max_cost_elements", 0, "sinkhorn_max_cost_elements=0 is outside [1, inf)"),
    ],
)
def test_each_invalid_value_names_field_value_and_range(field, value, message):
    with pytest.raises(SinkdError) as info:
        DistillConfig(**{field: value})
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_every_field_is_validated_and_documented():
    """Guards against adding a field without validation: each field rejects a value of the wrong type."""
    for f in dataclasses.fields(DistillConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        with pytest.raises(SinkdError, match=f.name):
            DistillConfig(**{f.name: object()})


def test_all_terms_off_is_rejected():
    with pytest.raises(SinkdError, match="every loss term is off"):
        DistillConfig(alpha=1.0, use_kl=False, distribution_term="none")


def test_from_dict_rejects_unknown_keys_listing_the_known_ones():
    with pytest.raises(SinkdError) as info:
        DistillConfig.from_dict({"alpah": 0.5, "beta": 0.1})
    message = str(info.value)
    assert "unknown DistillConfig key(s) 'alpah' (did you mean 'alpha'?)" in message
    for f in dataclasses.fields(DistillConfig):
        assert f.name in message
    assert "\n" not in message


def test_from_dict_to_dict_round_trip_and_integer_coercion():
    cfg = DistillConfig.from_dict({"alpha": 0.5, "sinkhorn_iters": 10.0, "sinkhorn_variant": "sample"})
    assert cfg.sinkhorn_iters == 10 and isinstance(cfg.sinkhorn_iters, int)
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    assert set(DistillConfig.help_texts()) == set(cfg.to_dict())


def test_released_preset_sets_mass_and_scale():
    cfg = DistillConfig(sinkhorn_scale_preset="released")
    assert (cfg.sinkhorn_mass, cfg.sinkhorn_scale) == ("batch", 0.001)
    cfg = DistillConfig(sinkhorn_scale_preset="unit", sinkhorn_mass="batch", sinkhorn_scale=5.0)
    assert (cfg.sinkhorn_mass, cfg.sinkhorn_scale) == ("unit", 1.0)
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
