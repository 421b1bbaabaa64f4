"""diffusers' UNet2DModel <-> our U-Net (src/formats/diffusers.py, convert.py format=diffusers): output parity on
random weights at google/ddpm-cifar10-32's and the DDPM 256 px configs, the bit-identical round trip, exported
DDPMPipeline folders sampling what we sample, and the one-line errors. All weights are random: no downloads."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_unet import perturb_zero_init

from src.checkpoints import load_module, load_pretrained
from src.cli import run_command
from src.conversion import run as convert_run
from src.diffusion import SamplerOptions, sample
from src.errors import RunError
from src.formats import ConversionError, import_checkpoint
from src.formats import diffusers as diffusers_format
from src.models import UNet

diffusers = pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parents[1]

# google/ddpm-cifar10-32's config.json (DDPM's CIFAR-10 net, converted from the TensorFlow release), and the
# DDPM 256 px net of google/ddpm-ema-church-256 / google/ddpm-celebahq-256 (same keys, other values).
DDPM_CIFAR10 = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
DDPM_256 = {
    **DDPM_CIFAR10,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "sample_size": 256,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
# google/ddpm-cifar10-32's scheduler_config.json
DDPM_SCHEDULER = {
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}
# A small net in the same layout, for what needs a whole checkpoint (two levels of 32 and 64 channels).
SMALL = {
    **DDPM_CIFAR10,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
}
PARITY_ATOL = 1e-5


def with_defaults(config: dict) -> dict:
    """A UNet2DModel config as `UNet2DModel.config` holds it: the given keys over diffusers' defaults."""
    defaults = {
        k: v.default
        for k, v in inspect.signature(diffusers.UNet2DModel.__init__).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    return {**defaults, **config}


def random_unet(config: dict, seed: int = 0, scale: float = 0.02) -> "diffusers.UNet2DModel":
    """A UNet2DModel of `config` with random weights (diffusers' init plus noise, so no layer is trivial)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(scale * torch.randn_like(p))
    return unet


def ours_of(unet) -> UNet:
    """Our U-Net built from the UNet2DModel's config, holding its weights (the converter's mapping)."""
    config = dict(unet.config)
    model, (channels, size) = diffusers_format.model_config(config)
    net = UNet(
        in_channels=channels,
        out_channels=config["out_channels"],
        image_size=size,
        **{k: v for k, v in model.items() if k != "_target_"},
    ).eval()
    layout = diffusers_format.layout(net, flip_sin_to_cos=config["flip_sin_to_cos"])
    net.load_state_dict(diffusers_format.convert(layout, unet.state_dict(), "ours"), strict=True)
    return net


def max_difference(net, unet, size: int, channels: int = 3, labels=None) -> float:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, size, size, generator=gen)
    t = torch.tensor([3, 871])
    with torch.no_grad():
        ours = net(x, t) if labels is None else net(x, t, labels)
        theirs = unet(x, t, class_labels=labels).sample
    return (ours - theirs).abs().max().item()


def save_folder(unet, path: Path, scheduler: dict | None = None) -> Path:
    """The folder DDPMPipeline.save_pretrained writes (model_index.json, unet/, scheduler/)."""
    scheduler = diffusers.DDPMScheduler(**(scheduler or DDPM_SCHEDULER))
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


# --- parity -----------------------------------------------------------------------------------------
def test_matches_diffusers_at_ddpm_cifar10_config():
    unet = random_unet(DDPM_CIFAR10)
    net = ours_of(unet)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in unet.parameters())
    assert max_difference(net, unet, 32) < PARITY_ATOL


def test_matches_diffusers_at_ddpm_256_config_small_images():
    # The 256 px net's layers at 32 px (six levels: 32, 16, ..., 1; attention at level 4, where 256 px has 16).
    unet = random_unet({**DDPM_256, "sample_size": 32})
    assert max_difference(ours_of(unet), unet, 32) < PARITY_ATOL


@pytest.mark.parametrize(
    "name,config,params",
    [("ddpm_cifar10_released", DDPM_CIFAR10, 35_746_307), ("ddpm_256_released", DDPM_256, 113_673_219)],
)
def test_released_ddpm_model_configs_are_the_hub_models(name, config, params):
    model, (channels, size) = diffusers_format.model_config(with_defaults(config))
    yaml = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"))
    defaults = {
        k: v.default
        for k, v in inspect.signature(UNet.__init__).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    for key, value in model.items():
        if key != "dropout":  # a training setting the hub configs do not record
            assert yaml.get(key, defaults.get(key)) == value, key
    with torch.device("meta"):
        ours = instantiate(OmegaConf.create(yaml), in_channels=channels, out_channels=3, image_size=size)
        theirs = diffusers.UNet2DModel(**config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == params


@pytest.mark.parametrize(
    "change",
    [
        {"flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "norm_eps": 1e-5},  # diffusers' defaults
        {"resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 32, "attention_head_dim": 32},
        {
            "downsample_type": "resnet",
            "upsample_type": "resnet",
            "down_block_types": ["AttnDownBlock2D", "ResnetDownsampleBlock2D"],
            "up_block_types": ["ResnetUpsampleBlock2D", "AttnUpBlock2D"],
            "dropout": 0.1,
        },
        {"num_class_embeds": 5, "out_channels": 6},
    ],
    ids=["sin-cos-order", "scale-shift-heads", "resnet-updown", "class-labels-learned-sigma"],
)
def test_matches_diffusers_with_each_option(change):
    unet = random_unet({**SMALL, **change}, scale=0.05)
    net = ours_of(unet)
    labels = torch.tensor([1, 4]) if "num_class_embeds" in change else None
    assert max_difference(net, unet, 32, labels=labels) < PARITY_ATOL


# --- checkpoints, round trip, pipelines ---------------------------------------------------------------
def test_import_gives_an_ordinary_checkpoint(tmp_path):
    unet = random_unet(SMALL, scale=0.05)
    folder = save_folder(unet, tmp_path / "ddpm")
    ckpt, module = import_checkpoint("diffusers", folder, output_dir=tmp_path)
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["run_config"])
    assert cfg.schedule.name == "linear" and cfg.schedule.num_timesteps == 1000
    assert (cfg.diffusion.mean_type, cfg.diffusion.var_type) == ("eps", "fixed_large")
    assert cfg.data._target_ == "src.data.CIFAR10DataModule" and cfg.model.timestep_freq_shift == 1
    assert any(k.startswith("net.") for k in ckpt["state_dict"]) and any(
        k.startswith("ema.model.") for k in ckpt["state_dict"]
    )
    torch.save(ckpt, tmp_path / "ddpm.ckpt")
    loaded = load_module(tmp_path / "ddpm.ckpt")  # what sample.py / evaluate.py do
    assert max_difference(loaded.ema.model, unet, 32) < PARITY_ATOL
    assert max_difference(loaded.net, unet, 32) < PARITY_ATOL
    # load_pretrained takes the folder itself, or the written checkpoint
    for source in (folder, tmp_path / "ddpm.ckpt"):
        net, diffusion, run_cfg = load_pretrained(source)
        assert diffusion.num_timesteps == 1000 and run_cfg.model.downsample_padding == "same"
        assert max_difference(net, unet, 32) < PARITY_ATOL


def test_sample_and_evaluate_take_a_converted_checkpoint(tmp_path, compose_sample, compose_evaluate):
    from src.evaluation import run as evaluate_run
    from src.sampling.modes import run as sample_run

    folder = save_folder(random_unet(SMALL, scale=0.05), tmp_path / "ddpm")
    ckpt = convert_run(OmegaConf.create({"format": "diffusers", "src": str(folder), "dst": str(tmp_path / "c.ckpt")}))
    written = sample_run(
        compose_sample(
            f"ckpt_path={ckpt}",
            "device=cpu",
            "num_samples=2",
            "sampler=ddim",
            "steps=2",
            output_dir=tmp_path / "sample",
        )
    )
    assert written["samples"].is_file()
    metrics = evaluate_run(
        compose_evaluate(
            f"ckpt_path={ckpt}",
            "device=cpu",
            "num_samples=2",
            "batch_size=2",
            "sampler=ddim",
            "steps=2",
            "fid=false",
            output_dir=tmp_path / "eval",
        )
    )
    assert metrics["diffusion"]["num_timesteps"] == 1000 and (tmp_path / "eval" / "samples_2x32x32x3.npz").is_file()


@pytest.mark.slow
def test_train_fine_tunes_a_converted_checkpoint(tmp_path, compose_train):
    """train.py ckpt_path=<converted file> starts from its weights with a fresh optimizer (the run config must
    describe the same model, schedule and objective, as for any resume; the error lists the values)."""
    unet = random_unet({**SMALL, "in_channels": 1, "out_channels": 1, "sample_size": 16}, scale=0.05)
    folder = save_folder(unet, tmp_path / "ddpm")
    ckpt = convert_run(OmegaConf.create({"format": "diffusers", "src": str(folder), "dst": str(tmp_path / "c.ckpt")}))
    assert load_module(ckpt).hparams["run_config"]["data"]["_target_"] == "src.data.DigitsDataModule"
    from src.training import train

    cfg = compose_train(
        f"ckpt_path={ckpt}",
        "objective=simple",
        "schedule.num_timesteps=1000",
        "model.attention_resolutions=[16]",
        "+model.timestep_freq_shift=1",
        "+model.downsample_padding=same",
        "trainer.max_steps=2",
        "callbacks.sample_grid=null",
    )
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 2
    before = load_module(ckpt).net.state_dict()
    after = objects["module"].net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained on from the converted weights
    assert max((before[k] - after[k]).abs().max() for k in before) < 0.1


ADM_LIKE = {
    **SMALL,
    "resnet_time_scale_shift": "scale_shift",
    "attn_norm_num_groups": 32,
    "attention_head_dim": 32,
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "down_block_types": ["AttnDownBlock2D", "ResnetDownsampleBlock2D"],
    "up_block_types": ["ResnetUpsampleBlock2D", "AttnUpBlock2D"],
    "norm_eps": 1e-5,
    "downsample_padding": 1,
}  # (the padding of a conv that resnet blocks replace: diffusers' default)


@pytest.mark.parametrize("config", [DDPM_CIFAR10, ADM_LIKE], ids=["ddpm-cifar10-32", "scale-shift-resnet-heads"])
def test_round_trip_is_bit_identical(tmp_path, config):
    unet = random_unet(config)
    ckpt, module = import_checkpoint("diffusers", save_folder(unet, tmp_path / "in"), output_dir=tmp_path)
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["run_config"])
    out = diffusers_format.export(cfg, module.ema.model, tmp_path / "out")
    back = diffusers.UNet2DModel.from_pretrained(out / "unet")
    original, again = unet.state_dict(), back.state_dict()
    assert list(original) == list(again)
    assert all(torch.equal(original[k], again[k]) for k in original)
    exported = json.loads((out / "unet" / "config.json").read_text())
    assert {k: exported[k] for k in config} == config
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "fixed_large"


@pytest.mark.parametrize(
    "overrides",
    [
        ["schedule=cosine", "schedule.num_timesteps=10"],  # fixed_large, eps
        ["schedule=linear", "schedule.num_timesteps=30", "objective=hybrid"],  # learned range, 2C outputs
        [
            "schedule=cosine",
            "schedule.num_timesteps=10",
            "objective=simple",
            "objective.var_type=fixed_small",
            "objective.mean_type=x0",
            "model.num_heads=2",
            "+model.downsample_padding=same",
        ],
        ["schedule=cosine", "schedule.num_timesteps=10", "objective=v_simple", "objective.var_type=fixed_small"],
    ],
    ids=["cosine-fixed-large", "linear-learned-range", "x0-fixed-small-heads", "v-fixed-small"],
)
def test_exported_pipeline_samples_what_we_sample(compose_train, tmp_path, overrides):
    from src.builders import build_module

    cfg = compose_train(
        "model.base_channels=32",
        "model.channel_mult=[1,2]",
        "model.attention_resolutions=[8]",
        "data.image_size=16",
        *overrides,
    )
    module = build_module(cfg, channels=1, image_size=16)
    perturb_zero_init(module.net)
    module.ema.model.load_state_dict(module.net.state_dict())
    torch.save(
        {
            "state_dict": module.state_dict(),
            "global_step": 0,
            "hyper_parameters": {"run_config": module.hparams["run_config"]},
        },
        tmp_path / "last.ckpt",
    )
    convert_run(
        OmegaConf.create(
            {
                "format": "diffusers",
                "direction": "export",
                "src": str(tmp_path / "last.ckpt"),
                "dst": str(tmp_path / "pipe"),
            }
        )
    )
    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    pipeline.set_progress_bar_config(disable=True)
    steps = module.diffusion.num_timesteps
    theirs = pipeline(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, output_type="np"
    ).images
    ours = sample(
        module.diffusion,
        module.ema.model,
        (2, 1, 16, 16),
        SamplerOptions("ddpm"),
        generator=torch.Generator().manual_seed(0),
    )
    ours = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(theirs - ours).max() < 1e-4


@pytest.mark.slow  # convert.py end to end, in a subprocess
def test_convert_command(tmp_path):
    """python convert.py as documented: a diffusers folder in, a checkpoint out, exported back to a folder."""
    folder = save_folder(random_unet(SMALL, scale=0.05), tmp_path / "ddpm")
    ckpt, out = tmp_path / "ddpm.ckpt", tmp_path / "exported"
    for args in ([f"src={folder}", f"dst={ckpt}"], ["direction=export", f"src={ckpt}", f"dst={out}"]):
        done = subprocess.run(
            [sys.executable, "convert.py", "format=diffusers", *args, f"hydra.run.dir={tmp_path}/run"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert load_module(ckpt).hparams["run_config"]["model"]["base_channels"] == 32
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()


def test_command_errors_are_one_line(tmp_path, capsys):
    cfg = OmegaConf.create({"format": "diffusers", "src": str(tmp_path / "missing"), "dst": str(tmp_path / "x.ckpt")})
    with pytest.raises(SystemExit) as exit_info:
        run_command(convert_run, cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: src={tmp_path / 'missing'} is neither a diffusers folder")
    assert not (tmp_path / "x.ckpt").exists()


# --- failures -----------------------------------------------------------------------------------------
def test_offline_hub_id_says_where_to_download(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        RunError,
        match=r"hf download ddpm-lightning-tests/no-such-model --local-dir "
        r"pretrained/ddpm-lightning-tests--no-such-model.*src=pretrained/",
    ):
        load_pretrained("ddpm-lightning-tests/no-such-model")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"time_embedding_type": "fourier"}, r"time_embedding_type='fourier'.*only 'positional'"),
        ({"resnet_time_scale_shift": "scale_shift"}, r"attn_norm_num_groups=None.*drops the middle one"),
        ({"up_block_types": ["UpBlock2D", "UpBlock2D"]}, r"up_block_types.*same levels"),
        ({"block_out_channels": [64, 96]}, r"block_out_channels.*multiple of the first"),
        ({"block_out_channels": [16, 32]}, r"block_out_channels.*multiple of 32"),
        ({"class_embed_type": "timestep"}, r"class_embed_type='timestep'"),
    ],
)
def test_unsupported_diffusers_options_are_named(change, match):
    with pytest.raises(ConversionError, match=match):
        diffusers_format.model_config(with_defaults({**SMALL, **change}))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"beta_schedule": "scaled_linear"}, r"beta_schedule='scaled_linear'"),
        ({"beta_start": 0.001}, r"beta_start=0.001.*1e-4 to 0.02"),
        ({"prediction_type": "flow_prediction"}, r"prediction_type='flow_prediction'"),
        ({"variance_type": "learned"}, r"variance_type='learned'"),
    ],
)
def test_unsupported_scheduler_options_are_named(change, match):
    with pytest.raises(ConversionError, match=match):
        diffusers_format.train_overrides({**DDPM_SCHEDULER, **change}, 3, 3)


@pytest.mark.parametrize("prediction_type,mean_type", [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v")])
def test_scheduler_prediction_type_is_the_mean_type(prediction_type, mean_type):
    overrides = diffusers_format.train_overrides({**DDPM_SCHEDULER, "prediction_type": prediction_type}, 3, 3)
    assert f"objective.mean_type={mean_type}" in overrides


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["model.num_classes=10"],
            r"cannot export to diffusers: model.num_classes=10: .*without class labels \(train with model.num_classes=null",
        ),
        (["model.base_channels=16", "model.channel_mult=[1,1]"], r"model.base_channels=16 .*32 GroupNorm groups"),
        (
            ["model.num_heads=4", "model.attention_resolutions=[16,8]"],
            r"model.num_heads=4: a head count over attention widths \[32, 64\]",
        ),
        (["+model.timestep_scale=0.25"], r"model.timestep_scale=0.25"),
        (["objective=mu_mse"], r"objective.mean_type=mu"),
        (["model.patch_size=2", "model.attention_resolutions=[4]"], r"model.patch_size=2: .*no patchified first layer"),
    ],
    ids=["class-labels", "narrow", "head-count", "timestep-scale", "mu", "patches"],
)
def test_unexportable_models_are_named(compose_train, tmp_path, overrides, match):
    from test_samplers import write_checkpoint

    ckpt = write_checkpoint(
        lambda: compose_train("model.channel_mult=[1,2]", "model.attention_resolutions=[8]", *overrides),
        tmp_path / "last.ckpt",
    )
    with pytest.raises(ConversionError, match=match):
        convert_run(
            OmegaConf.create(
                {"format": "diffusers", "direction": "export", "src": str(ckpt), "dst": str(tmp_path / "out")}
            )
        )
    assert not (tmp_path / "out").exists()


def test_existing_dst_is_kept(tmp_path):
    folder = save_folder(random_unet(SMALL), tmp_path / "ddpm")
    dst = tmp_path / "taken.ckpt"
    dst.write_text("keep me")
    with pytest.raises(ConversionError, match="already exists.*overwrite=true"):
        convert_run(OmegaConf.create({"format": "diffusers", "src": str(folder), "dst": str(dst)}))
    assert dst.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddpm", "taken.ckpt"]  # no temporary left behind
