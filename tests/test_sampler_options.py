"""SamplerOptions and Guidance: every bad value fails on construction with a line that names the fix, and the
command-line merge of sample.py and evaluate.py is the same function."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from src.diffusion import SAMPLERS, Guidance, SamplerOptions
from src.errors import ConfigError
from src.sampling.loading import sampler_options


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(sampler="euler_a"), "unknown sampler 'euler_a'; choose one of"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(steps=2.5), "steps must be a positive integer"),
        (dict(steps=True), "steps must be a positive integer"),
        (dict(sampler="ddim", eta=-1.0), "eta must be a number >= 0"),
        (dict(sampler="ddpm", eta=0.5), "eta=0.5 has no effect with sampler=ddpm"),
        (dict(spacing=[10, "a"]), "spacing as a list must hold integer timesteps"),
        (dict(spacing=1.5), "spacing must be a string"),
        (dict(clip_denoised="yes"), "clip_denoised must be true or false"),
    ],
)
def test_bad_options_fail_on_construction(values, message):
    with pytest.raises(ValueError, match=message):
        SamplerOptions(**values)


def test_options_normalise_and_list_their_timesteps():
    assert SamplerOptions().timesteps(10) == list(range(10))
    assert SamplerOptions(steps=10).timesteps(10) == list(range(10))
    assert SamplerOptions(steps=4).timesteps(10) == [0, 3, 6, 9]
    assert SamplerOptions(spacing=5).spacing == "5"  # an int is improved-diffusion's even spacing
    listed = SamplerOptions(spacing=[0, 5, 9])
    assert listed.spacing == (0, 5, 9) and listed.timesteps(10) == [0, 5, 9]
    assert listed.as_dict()["spacing"] == [0, 5, 9]
    assert SamplerOptions("ddim", spacing="ddim5").timesteps(10) == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="unknown sampler option"):
        SamplerOptions.from_mapping({"sampler": "ddim", "stepz": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplerOptions().steps = 3  # frozen
    assert set(SAMPLERS) >= {"ddpm", "ddim"}


def test_guidance_checks_its_scales_and_relabels():
    with pytest.raises(ValueError, match="guidance scale must be a number"):
        Guidance(scale="3")
    y = torch.tensor([1, 2])
    moved = Guidance(scale=2, classifier_scale=0.5).for_labels(y)
    assert moved.y is y and moved.scale == 2.0 and moved.classifier_scale == 0.5


def test_the_command_line_goes_on_top_of_the_runs_sampler():
    trained = OmegaConf.create({"sampler": {"sampler": "ddpm", "steps": 250, "eta": 0.0, "clip_denoised": True}})
    cli = OmegaConf.create({"sampler": None, "steps": 50, "eta": None, "spacing": None})
    assert sampler_options(trained, cli) == SamplerOptions("ddpm", steps=50)
    cli = OmegaConf.create(
        {"sampler": {"sampler": "ddim", "steps": 20, "eta": 0.0}, "steps": None, "eta": 0.5, "spacing": [10, 15, 20]}
    )
    # a list on the command line is improved-diffusion's "10,15,20": section counts, not timesteps
    options = sampler_options(trained, cli)
    assert options == SamplerOptions("ddim", steps=20, eta=0.5, spacing="10,15,20")
    kept = options.timesteps(1000)
    assert len(kept) == 45 and kept[-1] == 999 and kept[0] == 0
    with pytest.raises(ConfigError, match="eta must be a number >= 0"):
        sampler_options(trained, OmegaConf.create({"sampler": None, "eta": -1}))
