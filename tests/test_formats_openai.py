"""openai's improved-diffusion / guided-diffusion .pt files -> our checkpoints (src/formats/openai.py, convert.py
format=openai, conf/preset/): the U-Net options against the reference UNetModel / EncoderUNetModel of the
guided-diffusion-sdk package, our diffusion math against its GaussianDiffusion on one converted net with the same
noise, the parameter counts of the released configs, and the one-line errors. Random weights, small sizes."""

import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from src.checkpoints import load_module, load_pretrained
from src.diffusion import Guidance, SamplerOptions, discretized_gaussian_log_likelihood, sample
from src.errors import RunError
from src.formats import ConversionError, import_checkpoint
from src.formats.openai import load_preset

with warnings.catch_warnings():
    # guided_diffusion/nn.py decorates with torch.cuda.amp.custom_fwd / custom_bwd, deprecated since torch 2.4
    warnings.filterwarnings(
        "ignore", message=r"`torch\.cuda\.amp\.custom_(fwd|bwd)\(args\.\.\.\)` is deprecated", category=FutureWarning
    )
    gd = pytest.importorskip("guided_diffusion.gaussian_diffusion")
    respace = pytest.importorskip("guided_diffusion.respace")
    reference = pytest.importorskip("guided_diffusion.unet")

# Small nets and elementwise steps: one intra-op thread (a second one only stalls on these 2 cores).
pytestmark = pytest.mark.usefixtures("single_thread")
REPO = Path(__file__).resolve().parents[1]
MODEL_CONF = REPO / "conf" / "model"
NET_ATOL = 1e-5  # network outputs, ours vs the reference
MATH_ATOL = 1e-4  # bits/dim terms and samples after whole reverse runs

# The reference nets at the released models' flags, shrunk where the flags allow (width, blocks, image size).
# improved DDPM CIFAR-10: 4 heads, attention at 16 and 8 (downsample rates 2, 4), scale-shift norm, learned sigma.
IDDPM = dict(
    image_size=32,
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=(2, 4),
    dropout=0.3,
    channel_mult=(1, 2, 2, 2),
    num_heads=4,
    use_scale_shift_norm=True,
)
IDDPM_OURS = {"base_channels": 32, "num_res_blocks": 1}
# ADM ImageNet-64 class-conditional: heads by channels (32 here, 64 released), BigGAN up/down, new attention order,
# attention at 32, 16 and 8 (at 32 px: rates 1, 2, 4), labels without a null row; 4 classes instead of 1000.
ADM = dict(
    image_size=32,
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=(1, 2, 4),
    dropout=0.1,
    channel_mult=(1, 2, 3, 4),
    num_classes=4,
    num_head_channels=32,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=True,
)
ADM_OURS = {"base_channels": 32, "num_res_blocks": 1, "num_classes": 4, "num_head_channels": 32}
# ADM's 64x64 classifier: the encoder with attention pooling (legacy attention order), here at 32 px.
CLASSIFIER = dict(
    image_size=32,
    in_channels=3,
    model_channels=32,
    out_channels=4,
    num_res_blocks=1,
    attention_resolutions=(1, 2, 4),
    channel_mult=(1, 2, 3, 4),
    num_head_channels=32,
    use_scale_shift_norm=True,
    resblock_updown=True,
    pool="attention",
)
CLASSIFIER_OURS = {"base_channels": 32, "num_res_blocks": 1, "num_classes": 4, "num_head_channels": 32}
T = 100  # a short cosine schedule, so whole reverse runs and the bpd loop take a second


def random_reference(cls, flags: dict, seed: int = 0):
    """A reference net with random weights everywhere (its zero-initialised output layers included)."""
    torch.manual_seed(seed)
    net = cls(**flags).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def preset_for_test(name: str, model: dict, schedule_steps: int | None = None, **fields):
    """A conf/preset entry with a shrunk model (and schedule), as `+preset.config.model.x=...` would give."""
    preset = load_preset(name)
    config = {"model": model}
    if schedule_steps is not None:
        config["schedule"] = {"num_timesteps": schedule_steps}
        if model.get("timestep_scale") is None and name.startswith("iddpm"):
            config["model"] = {**model, "timestep_scale": 1000.0 / schedule_steps}  # rescale_timesteps
    return OmegaConf.merge(preset, {"config": config, **fields})


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    """An image folder with 4 classes of 32x32 images (what class-conditional presets check against)."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for k in range(4):
        (root / f"class{k}").mkdir()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"class{k}" / "0.png")
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory, class_folder):
    """Reference nets saved as .pt files and converted with the presets: name -> (reference, our module)."""
    folder = tmp_path_factory.mktemp("openai")
    cases = {
        "iddpm": (reference.UNetModel, IDDPM, "iddpm_cifar10_hybrid", IDDPM_OURS, {}, None),
        "adm": (
            reference.UNetModel,
            ADM,
            "adm_imagenet64_cond",
            ADM_OURS,
            {"image_size": 32, "num_classes": 4},
            {"root": str(class_folder)},
        ),
        "classifier": (
            reference.EncoderUNetModel,
            CLASSIFIER,
            "adm_imagenet64_classifier",
            CLASSIFIER_OURS,
            {"image_size": 32, "num_classes": 4},
            {"root": str(class_folder)},
        ),
    }
    out = {}
    for key, (cls, flags, name, ours, fields, data) in cases.items():
        ref = random_reference(cls, flags)
        torch.save(ref.state_dict(), folder / f"{key}.pt")
        preset = preset_for_test(name, ours, T, **fields)
        ckpt, module = import_checkpoint("openai", folder / f"{key}.pt", preset, data_overrides=data)
        out[key] = (ref, module)
    return out


def inputs(batch: int = 2, size: int = 32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen), torch.tensor([3, 87])[:batch]


# --- the networks -----------------------------------------------------------------------------------
def test_iddpm_cifar10_net_matches_the_reference(converted):
    ref, module = converted["iddpm"]
    x, t = inputs()
    with torch.no_grad():
        # improved-diffusion's rescale_timesteps: its net is called with t * 1000 / T; ours scales t itself
        expected = ref(x, t.float() * (1000.0 / T))
        assert (module.ema.model(x, t) - expected).abs().max() < NET_ATOL
        assert (module.net(x, t) - expected).abs().max() < NET_ATOL


def test_adm_class_conditional_net_matches_the_reference(converted):
    ref, module = converted["adm"]
    x, t = inputs()
    y = torch.tensor([1, 3])
    with torch.no_grad():
        assert (module.ema.model(x, t, y) - ref(x, t, y)).abs().max() < NET_ATOL
    with pytest.raises(ValueError, match="null_label=false"):
        module.ema.model(x, t)


def test_adm_classifier_matches_the_reference(converted):
    ref, module = converted["classifier"]
    x, t = inputs()
    with torch.no_grad():
        assert (module.ema.model(x, t) - ref(x, t)).abs().max() < NET_ATOL


@pytest.mark.parametrize(
    "flags",
    [
        dict(IDDPM, num_heads=1, use_scale_shift_norm=False),  # improved-diffusion's LSUN flags (no AdaGN)
        dict(IDDPM, num_head_channels=16, resblock_updown=True),  # heads by width, BigGAN blocks, legacy order
        dict(CLASSIFIER, pool="adaptive", use_scale_shift_norm=False, resblock_updown=False),
    ],
    ids=["plain", "head-channels-updown-legacy", "adaptive-pool"],
)
def test_option_combinations_match_the_reference(flags):
    from src.formats.openai import convert, layout
    from src.models import NoisyClassifier, UNet

    encoder = "pool" in flags
    ref = random_reference(reference.EncoderUNetModel if encoder else reference.UNetModel, flags)
    size = flags["image_size"]
    common = dict(
        in_channels=3,
        image_size=size,
        base_channels=flags["model_channels"],
        channel_mult=flags["channel_mult"],
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=[size // r for r in flags["attention_resolutions"]],
        num_heads=flags.get("num_heads", 1),
        num_head_channels=flags.get("num_head_channels"),
        scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=flags.get("resblock_updown", False),
        norm_eps=1e-5,
    )
    net = (
        NoisyClassifier(num_classes=flags["out_channels"], pool=flags["pool"], **common)
        if encoder
        else UNet(out_channels=flags["out_channels"], **common)
    ).eval()
    order = "new" if flags.get("use_new_attention_order") else "legacy"
    net.load_state_dict(convert(layout(net, order), ref.state_dict(), "ours"), strict=True)
    x, t = inputs()
    with torch.no_grad():
        assert (net(x, t) - ref(x, t)).abs().max() < NET_ATOL


@pytest.mark.parametrize(
    "name,flags,ours",
    [
        (
            "iddpm_cifar10",
            dict(IDDPM, model_channels=128, num_res_blocks=3),
            dict(in_channels=3, out_channels=6, image_size=32),
        ),
        (
            "adm_imagenet64_cond",
            dict(
                ADM,
                image_size=64,
                model_channels=192,
                num_res_blocks=3,
                num_classes=1000,
                num_head_channels=64,
                attention_resolutions=(2, 4, 8),
            ),
            dict(in_channels=3, out_channels=6, image_size=64),
        ),
        (
            "adm_imagenet64_classifier",
            dict(
                CLASSIFIER,
                image_size=64,
                model_channels=128,
                num_res_blocks=4,
                out_channels=1000,
                num_head_channels=64,
                attention_resolutions=(2, 4, 8),
            ),
            dict(in_channels=3, image_size=64),
        ),
    ],
)
def test_released_configs_have_the_reference_parameter_count(name, flags, ours):
    # Counted on the meta device: no memory or init time for the 296M net.
    with torch.device("meta"):
        net = instantiate(OmegaConf.load(MODEL_CONF / f"{name}.yaml"), **ours)
        ref = (reference.EncoderUNetModel if "pool" in flags else reference.UNetModel)(**flags)
    count = sum(p.numel() for p in net.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    expected = {"iddpm_cifar10": 52_546_438, "adm_imagenet64_cond": 295_904_454}  # DESIGN.md's reference numbers
    assert count == expected.get(name, count)


# --- the diffusion math on one converted net ------------------------------------------------------------
# Both diffusions run the same network (our converted one; its own parity is tested above), so what is compared
# is the math. The reference is told not to rescale timesteps: the converted net scales them itself.
def reference_diffusion(spacing: str | None = None):
    kwargs = dict(
        betas=gd.get_named_beta_schedule("cosine", T),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.RESCALED_MSE,
        rescale_timesteps=False,
    )
    if spacing is None:
        return gd.GaussianDiffusion(**kwargs)
    return respace.SpacedDiffusion(use_timesteps=respace.space_timesteps(T, spacing), **kwargs)


def test_bpd_terms_match_the_reference(converted, monkeypatch):
    _, module = converted["iddpm"]
    net = module.ema.model
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randint(0, 256, (2, 3, 32, 32), generator=gen).float() / 127.5 - 1.0
    ours = module.diffusion.calc_bpd_loop(net, x0, generator=torch.Generator().manual_seed(3))

    def reference_loop():
        torch.manual_seed(3)  # the reference draws each step's noise from the global generator
        with torch.no_grad():
            out = reference_diffusion().calc_bpd_loop(net, x0)
        # it stacks its per-step terms from t = T - 1 down to 0, ours by t
        return {k: v.flip(1) if v.ndim == 2 else v for k, v in out.items()}

    theirs = reference_loop()
    # Every KL term (t >= 1), the prior and both MSEs; the decoder term L_0 differs by design: the reference
    # integrates its bins with a tanh approximation of the normal CDF, src.diffusion with the exact one.
    for key in ("vb", "xstart_mse", "mse"):
        start = 1 if key == "vb" else 0
        assert (ours[key][:, start:] - theirs[key][:, start:]).abs().max() < MATH_ATOL, key
    assert (ours["prior_bpd"] - theirs["prior_bpd"]).abs().max() < MATH_ATOL
    assert (ours["vb"][:, 0] - theirs["vb"][:, 0]).abs().max() < 2e-2  # tanh-approximated vs exact CDF
    # With the exact CDF in the reference, every term and the total agree.
    monkeypatch.setattr(gd, "discretized_gaussian_log_likelihood", discretized_gaussian_log_likelihood)
    theirs = reference_loop()
    for key in ("vb", "xstart_mse", "mse", "total_bpd", "prior_bpd"):
        assert (ours[key] - theirs[key]).abs().max() < MATH_ATOL, key


@pytest.mark.parametrize("sampler,spacing", [("ddpm", None), ("ddim", None), ("ddim", "ddim25"), ("ddpm", "50")])
def test_sampling_matches_the_reference(converted, sampler, spacing):
    _, module = converted["iddpm"]
    net, shape = module.ema.model, (2, 3, 32, 32)
    ours = sample(
        module.diffusion,
        net,
        shape,
        SamplerOptions(sampler, spacing=spacing),
        generator=torch.Generator().manual_seed(4),
    )
    diffusion = reference_diffusion(spacing)
    torch.manual_seed(4)  # the reference draws x_T and every step's noise from the global generator
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    with torch.no_grad():
        theirs = loop(net, shape)
    assert (ours - theirs).abs().max() < MATH_ATOL


@pytest.mark.parametrize("sampler,spacing", [("ddpm", "50"), ("ddim", "ddim25")])
def test_classifier_guidance_matches_the_reference(converted, sampler, spacing):
    _, module = converted["adm"]
    _, classifier_module = converted["classifier"]
    net, classifier = module.ema.model, classifier_module.ema.model
    y, scale, shape = torch.tensor([0, 3]), 3.0, (2, 3, 32, 32)
    guidance = Guidance(y=y, classifier=classifier, classifier_scale=scale)
    ours = sample(
        module.diffusion,
        net,
        shape,
        SamplerOptions(sampler, spacing=spacing),
        guidance,
        generator=torch.Generator().manual_seed(5),
    )

    def cond_fn(x, t, y=None):  # guided-diffusion's scripts/classifier_sample.py
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    diffusion = reference_diffusion(spacing)
    torch.manual_seed(5)
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    theirs = loop(net, shape, cond_fn=cond_fn, model_kwargs={"y": y})
    assert (ours - theirs).abs().max() < MATH_ATOL


# --- the command and its errors -------------------------------------------------------------------------
@pytest.mark.slow  # convert.py end to end, in a subprocess
def test_convert_command_with_a_preset(tmp_path):
    """python convert.py format=openai with a preset (shrunk on the command line), then load it back."""
    ref = random_reference(reference.UNetModel, IDDPM)
    torch.save(ref.state_dict(), tmp_path / "cifar10_uncond_50M_500K.pt")
    dst = tmp_path / "iddpm.ckpt"
    done = subprocess.run(
        [
            sys.executable,
            "convert.py",
            "format=openai",
            f"src={tmp_path}/cifar10_uncond_50M_500K.pt",
            f"dst={dst}",
            "preset=iddpm_cifar10_hybrid",
            "+preset.config.model.base_channels=32",
            "+preset.config.model.num_res_blocks=1",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    module = load_module(dst)
    cfg = module.hparams["run_config"]
    assert (cfg["schedule"]["name"], cfg["schedule"]["num_timesteps"], cfg["objective"]["loss_type"]) == (
        "cosine",
        4000,
        "hybrid",
    )
    x, t = inputs()
    with torch.no_grad():
        assert (module.ema.model(x, t) - ref(x, t.float() * 0.25)).abs().max() < NET_ATOL
    net, diffusion, _ = load_pretrained(dst)
    assert diffusion.num_timesteps == 4000 and net.out_channels == 6
    # the library call on the .pt file itself, with the preset (here shrunk as on the command line)
    pt = tmp_path / "cifar10_uncond_50M_500K.pt"
    net, diffusion, cfg = load_pretrained(pt, preset=preset_for_test("iddpm_cifar10_hybrid", IDDPM_OURS))
    with torch.no_grad():
        assert (net(x, t) - ref(x, t.float() * 0.25)).abs().max() < NET_ATOL
    with pytest.raises(
        RunError, match=r"an openai \.pt state dict needs preset=<name> \(one of adm_imagenet64_classifier"
    ):
        load_pretrained(pt)


def test_evaluate_guides_a_converted_adm_with_its_converted_classifier(tmp_path, class_folder, compose_evaluate):
    """The README's guided ImageNet-64 commands, at test size: both files converted, then evaluate.py."""
    from src.conversion import run as convert_run
    from src.evaluation import run as evaluate_run

    written = {}
    for key, cls, flags, name, ours in [
        ("adm", reference.UNetModel, ADM, "adm_imagenet64_cond", ADM_OURS),
        ("classifier", reference.EncoderUNetModel, CLASSIFIER, "adm_imagenet64_classifier", CLASSIFIER_OURS),
    ]:
        torch.save(random_reference(cls, flags).state_dict(), tmp_path / f"{key}.pt")
        preset = preset_for_test(name, ours, T, image_size=32, num_classes=4)
        written[key] = convert_run(
            OmegaConf.create(
                {
                    "format": "openai",
                    "src": str(tmp_path / f"{key}.pt"),
                    "dst": str(tmp_path / f"{key}.ckpt"),
                    "preset": preset,
                    "data": {"root": str(class_folder)},
                }
            )
        )
    metrics = evaluate_run(
        compose_evaluate(
            f"ckpt_path={written['adm']}",
            "device=cpu",
            "num_samples=4",
            "batch_size=4",
            "sampler=ddim",
            "steps=3",
            "fid=false",
            "guidance_scales=[0]",
            f"classifier.ckpt_path={written['classifier']}",
            "classifier.scale=1.0",
            output_dir=tmp_path / "eval",
        )
    )
    assert metrics["guidance"]["num_classes"] == 4 and metrics["guidance"]["classifier"]["scale"] == 1.0
    assert (tmp_path / "eval" / "samples_4x32x32x3.npz").is_file()  # one guidance scale: in the run folder


def test_state_dict_of_another_model_names_keys_and_flags(tmp_path):
    ref = random_reference(reference.UNetModel, dict(IDDPM, num_res_blocks=2))
    torch.save(ref.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ConversionError) as err:
        import_checkpoint("openai", tmp_path / "other.pt", preset_for_test("iddpm_cifar10_hybrid", IDDPM_OURS))
    message = str(err.value)
    assert "does not match preset iddpm_cifar10_hybrid" in message and "\n" not in message
    # the preset's one block per level has a downsampler where the file's second block is
    assert re.search(r"\d+ missing: input_blocks\.2\.0\.op\.weight \[32, 32, 3, 3\]", message), message
    assert re.search(r"\d+ unexpected: input_blocks\.2\.0\.in_layers\.0\.weight \[32\]", message), message
    assert "--num_res_blocks 3 --learn_sigma True" in message  # the preset's flags


@pytest.mark.parametrize(
    "fields,data,match",
    [
        ({"image_size": 32, "num_classes": 4}, {"image_size": 64}, r"a 32x32 model but data.image_size=64"),
        ({"image_size": 32, "num_classes": 1000}, {}, r"has 1000 classes but the data .* has 4"),
    ],
    ids=["image-size", "classes"],
)
def test_preset_disagreeing_with_the_data_says_so(converted, class_folder, tmp_path, fields, data, match):
    ref, _ = converted["adm"]
    torch.save(ref.state_dict(), tmp_path / "adm.pt")
    preset = preset_for_test("adm_imagenet64_cond", ADM_OURS, T, **fields)
    with pytest.raises(ConversionError, match=match):
        import_checkpoint("openai", tmp_path / "adm.pt", preset, data_overrides={"root": str(class_folder), **data})


@pytest.mark.slow
def test_missing_preset_and_unreadable_files_are_one_line(tmp_path):
    from src.conversion import run

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for cfg, match in [
        (
            {"format": "openai", "src": str(tmp_path / "junk.pt"), "dst": str(tmp_path / "x.ckpt")},
            r"format=openai needs preset=<name>",
        ),
        (
            {
                "format": "openai",
                "src": str(tmp_path / "junk.pt"),
                "dst": str(tmp_path / "x.ckpt"),
                "preset": load_preset("iddpm_cifar10_hybrid"),
            },
            r"cannot read .*junk.pt as a state dict",
        ),
        ({"format": "openai", "direction": "export", "src": "x", "dst": "y"}, r"format=openai is import only"),
    ]:
        with pytest.raises(ConversionError, match=match):
            run(OmegaConf.create(cfg))
    assert not (tmp_path / "x.ckpt").exists()
    with pytest.raises(ConversionError, match="unknown preset 'nope'; choose one of adm_imagenet64_classifier"):
        load_preset("nope")
