"""The DDPM U-Net: shapes, the paper's size, conditioning, validation errors, gradient flow, configs."""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.models import NoisyClassifier, UNet

MODEL_CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

# A tiny net for the behavioural tests (fast on CPU).
TINY = dict(
    in_channels=1,
    out_channels=1,
    image_size=16,
    base_channels=32,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_resolutions=[8],
    num_heads=2,
)
# The DDPM paper's CIFAR-10 net (Ho et al. 2020, appendix B).
CIFAR10 = dict(
    in_channels=3,
    out_channels=3,
    image_size=32,
    base_channels=128,
    channel_mult=[1, 2, 2, 2],
    num_res_blocks=2,
    attention_resolutions=[16],
    dropout=0.1,
)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def perturb_zero_init(net: torch.nn.Module, seed: int = 0) -> None:
    """Fill the zero-initialised layers with small random values so every path affects the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def diffusers_unet(
    in_channels, out_channels, image_size, base_channels, channel_mult, num_res_blocks, attention_resolutions, **_
):
    """diffusers' UNet2DModel at the same configuration (one attention head, 32 GroupNorm groups)."""
    diffusers = pytest.importorskip("diffusers")
    resolutions = [image_size // 2**i for i in range(len(channel_mult))]
    attn = [r in attention_resolutions for r in resolutions]
    return diffusers.UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(base_channels * m for m in channel_mult),
        layers_per_block=num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=32,
        attention_head_dim=None,
    )


@pytest.mark.parametrize(
    "channels,size,out_mult,mult,attn",
    [
        (1, 16, 1, [1, 2, 2], [8]),
        (3, 32, 1, [1, 2, 2, 2], [16]),
        (3, 32, 2, [1, 2], [32, 16]),  # learned variance: 2C outputs
        (1, 16, 2, [1], []),  # a single level, no attention, no resampling
    ],
)
def test_output_shape(channels, size, out_mult, mult, attn):
    net = UNet(
        in_channels=channels,
        out_channels=out_mult * channels,
        image_size=size,
        base_channels=32,
        channel_mult=mult,
        num_res_blocks=1,
        attention_resolutions=attn,
    )
    x = torch.randn(3, channels, size, size)
    out = net(x, torch.tensor([0, 10, 999]))
    assert out.shape == (3, out_mult * channels, size, size)
    assert out.dtype == x.dtype


def test_zero_init_outputs_zero():
    # Zero-initialised output conv: training starts from eps_hat = 0.
    net = UNet(**TINY)
    assert torch.equal(net(torch.randn(2, 1, 16, 16), torch.tensor([3, 7])), torch.zeros(2, 1, 16, 16))


def test_paper_parameter_count():
    # Ho et al. 2020: 35.7M parameters for the CIFAR-10 model.
    n = num_params(UNet(**CIFAR10))
    assert abs(n - 35.7e6) <= 0.1e6, n


@pytest.mark.parametrize(
    "config",
    [
        CIFAR10,
        dict(TINY, base_channels=64, channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[16, 4]),
        dict(TINY, in_channels=3, out_channels=6, image_size=32, channel_mult=[1, 2], attention_resolutions=[32]),
    ],
    ids=["cifar10", "three-levels-two-attn", "learned-variance"],
)
def test_parameter_count_matches_diffusers(config):
    # Same architecture as diffusers' UNet2DModel (google/ddpm-cifar10-32 layout), layer for layer.
    assert num_params(UNet(**config)) == num_params(diffusers_unet(**config))


def test_attention_matches_reference():
    # Multi-head attention over positions, written out by hand: softmax(q k^T / sqrt(d)) v per head,
    # with the qkv conv's output channels laid out as [q | k | v], each split into heads.
    from src.models.blocks import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(channels=8, num_heads=2)
    perturb_zero_init(block)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x)).flatten(2)  # [B, 3C, HW]
        heads = []
        for h in range(2):
            q, k, v = (qkv[:, i * 8 + h * 4 : i * 8 + h * 4 + 4] for i in range(3))  # [B, 4, HW]
            weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 2.0, dim=-1)
            heads.append(torch.einsum("bij,bcj->bci", weights, v))
        expected = x + block.proj(torch.cat(heads, dim=1).reshape(2, 8, 4, 4))
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_output_depends_on_timestep():
    torch.manual_seed(0)
    net = UNet(**TINY).eval()
    perturb_zero_init(net)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        a = net(x, torch.tensor([0, 0]))
        b = net(x, torch.tensor([500, 500]))
        c = net(x, torch.tensor([0.0, 0.0]))  # float timesteps are accepted
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()
    assert torch.allclose(a, c)


def test_label_embedding_changes_output():
    torch.manual_seed(0)
    net = UNet(**TINY, num_classes=10).eval()
    perturb_zero_init(net)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([100, 100])
    with torch.no_grad():
        out3 = net(x, t, torch.tensor([3, 3]))
        out7 = net(x, t, torch.tensor([7, 7]))
        out_none = net(x, t)
        out_null = net(x, t, torch.tensor([10, 10]))  # label num_classes is the null label
    assert not torch.allclose(out3, out7)
    assert not torch.allclose(out3, out_none)
    assert torch.allclose(out_none, out_null, atol=1e-6)


def test_labels_rejected_when_unconditional():
    net = UNet(**TINY)
    with pytest.raises(ValueError, match="num_classes=None"):
        net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "change,match",
    [
        (
            dict(image_size=18, channel_mult=[1, 2, 2]),
            r"divisible by 2\*\*\(len\(channel_mult\)-1\)=4.*such as 16 or 20",
        ),
        (dict(attention_resolutions=[4]), r"never visited.*resolutions \[16, 8\]"),
        (dict(base_channels=48), r"multiple of 32"),
        (dict(num_heads=3), r"num_heads=3 does not divide"),
        (dict(num_res_blocks=0), r"num_res_blocks must be >= 1"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(channel_mult=[]), r"channel_mult must be a non-empty"),
        (dict(num_classes=0), r"num_classes must be >= 1"),
        (dict(patch_size=3), r"patch_size must be a positive divisor of image_size=16, got 3"),
        (dict(patch_size=2, attention_resolutions=[16]), r"image_size=16, patch_size=2 .*resolutions \[8, 4\]"),
        (
            dict(image_size=20, patch_size=2, channel_mult=[1, 2, 2]),
            r"image_size=20 must be divisible by patch_size \* 2\*\*\(len\(channel_mult\)-1\)=8.*such as 16 or 24",
        ),
    ],
)
def test_constructor_validation(change, match):
    with pytest.raises(ValueError, match=match):
        UNet(**{**TINY, **change})


def test_forward_validation():
    net = UNet(**TINY)
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 1, 16, 16\]"):
        net(torch.randn(2, 1, 32, 32), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 1, 16, 16\]"):
        net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"expected t of shape \[2\]"):
        net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("num_classes", [None, 5])
def test_gradients_reach_every_parameter(num_classes):
    torch.manual_seed(0)
    net = UNet(**TINY, num_classes=num_classes)
    # Straight from init every parameter must be in the graph (DDP's unused-parameter check) ...
    net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2])).square().mean().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    # ... and once the zero-init layers are non-zero, every parameter gets a non-zero gradient.
    net.zero_grad(set_to_none=True)
    perturb_zero_init(net)
    y = None if num_classes is None else torch.tensor([0, 4])
    net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), y).square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


@pytest.mark.parametrize(
    "name,channels,size",
    [
        ("unet_small", 1, 16),
        ("unet_ddpm_cifar10", 3, 32),  # run at batch 1 only
    ],
)
def test_yaml_configs_instantiate(name, channels, size):
    import src.builders  # noqa: F401  (registers the sizes_at_downsample resolver of unet_small's attention)

    # A model config may follow the data's image size (${data.image_size}), as it does inside the train config.
    cfg = OmegaConf.create({"data": {"image_size": size}, "model": OmegaConf.load(MODEL_CONF / f"{name}.yaml")}).model
    assert not {"in_channels", "out_channels", "image_size"} & set(cfg.keys())
    net = instantiate(cfg, in_channels=channels, out_channels=2 * channels, image_size=size)
    assert isinstance(net, UNet)
    with torch.no_grad():
        out = net(torch.randn(1, channels, size, size), torch.tensor([5]))
    assert out.shape == (1, 2 * channels, size, size)


# --- the options of the released improved DDPM / ADM nets (each off by default) ------------------------------
def test_scale_shift_norm_and_residual_resampling_blocks():
    from src.models.blocks import Downsample, ResBlock, Upsample

    net = UNet(**{**TINY, "num_res_blocks": 2}, scale_shift_norm=True, resblock_updown=True)
    resblocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert all(m.emb_proj.out_features == 2 * m.conv1.out_channels for m in resblocks)  # a scale and a shift
    assert [m.resample for m in resblocks if m.resample] == ["down", "up"]
    assert not any(isinstance(m, (Downsample, Upsample)) for m in net.modules())
    plain = UNet(**{**TINY, "num_res_blocks": 2})
    assert [type(m) for m in plain.down] != [type(m) for m in net.down]
    assert net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2])).shape == (2, 1, 16, 16)


def test_heads_by_channels_per_head():
    from src.models.blocks import AttentionBlock

    net = UNet(**{**TINY, "attention_resolutions": [16, 8]}, num_head_channels=16)
    heads = {m.qkv.in_channels: m.num_heads for m in net.modules() if isinstance(m, AttentionBlock)}
    assert heads == {32: 2, 64: 4}


def test_class_embedding_without_a_null_label():
    net = UNet(**TINY, num_classes=10, null_label=False)
    assert net.label_embed.num_embeddings == 10
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    assert net(x, t, torch.tensor([0, 9])).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="null_label=false.*give a class label"):
        net(x, t)
    with pytest.raises(ValueError, match="label 10 .* does not exist"):
        net(x, t, torch.tensor([10, 0]))


def test_timestep_frequencies_and_scale():
    from src.models.blocks import SinusoidalTimestepEmbedding

    t = torch.tensor([0, 7, 999])
    shifted = SinusoidalTimestepEmbedding(8, freq_shift=1)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 3)  # DDPM's TensorFlow code: / (half - 1)
    args = t[:, None].float() * freqs
    assert torch.allclose(shifted(t), torch.cat([args.sin(), args.cos()], dim=1))
    scaled = SinusoidalTimestepEmbedding(8, scale=0.25)  # improved-diffusion's rescale_timesteps at T=4000
    assert torch.equal(scaled(t), SinusoidalTimestepEmbedding(8)(t.float() * 0.25))


def test_same_padding_downsample_pads_after_the_image():
    import torch.nn.functional as F

    from src.models.blocks import Downsample

    block = Downsample(4, padding="same")
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(block(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), block.conv.weight, block.conv.bias, stride=2))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_head_channels=24), r"num_head_channels=24 does not divide the 64 channels"),
        (dict(resblock_updown=True, downsample_padding="same"), r"resblock_updown=true replaces"),
        (dict(timestep_scale=0.0), r"timestep_scale must be > 0"),
        (dict(timestep_freq_shift=2), r"freq_shift must be 0 or 1"),
        (dict(downsample_padding="valid"), r"downsample_padding must be 'symmetric' or 'same'"),
    ],
)
def test_option_validation(change, match):
    with pytest.raises(ValueError, match=match):
        UNet(**{**TINY, **change})


@pytest.mark.parametrize(
    "options",
    [
        dict(scale_shift_norm=True, resblock_updown=True, num_head_channels=32, num_classes=3, null_label=False),
        dict(timestep_freq_shift=1, downsample_padding="same", norm_eps=1e-5, timestep_scale=0.25),
    ],
    ids=["adm", "ddpm-tf"],
)
def test_gradients_reach_every_parameter_with_the_options(options):
    torch.manual_seed(0)
    net = UNet(**TINY, **options)
    perturb_zero_init(net)
    y = torch.tensor([0, 2]) if options.get("num_classes") else None
    net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), y).square().mean().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_default_options_build_the_same_seeded_net():
    # Today's configs pass none of the new options; passing their defaults changes nothing either.
    defaults = dict(
        num_head_channels=None,
        scale_shift_norm=False,
        resblock_updown=False,
        null_label=True,
        norm_eps=1e-6,
        timestep_freq_shift=0,
        timestep_scale=1.0,
        downsample_padding="symmetric",
    )
    torch.manual_seed(0)
    a = UNet(**TINY, num_classes=3).state_dict()
    torch.manual_seed(0)
    b = UNet(**TINY, num_classes=3, **defaults).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "name,channels,size,out",
    [
        ("iddpm_cifar10", 3, 32, 6),
        ("ddpm_cifar10_released", 3, 32, 3),
        ("ddpm_256_released", 3, 256, 3),
        ("adm_imagenet64_cond", 3, 64, 6),
        ("adm_imagenet64_classifier", 3, 64, None),
    ],
)
def test_released_model_configs_build(name, channels, size, out):
    import src.builders  # noqa: F401  (registers the sizes_at_downsample resolver of unet_small's attention)

    # A model config may follow the data's image size (${data.image_size}), as it does inside the train config.
    cfg = OmegaConf.create({"data": {"image_size": size}, "model": OmegaConf.load(MODEL_CONF / f"{name}.yaml")}).model
    assert not {"in_channels", "out_channels", "image_size"} & set(cfg.keys())
    derived = dict(in_channels=channels, image_size=size, **({"out_channels": out} if out else {}))
    with torch.device("meta"):  # shapes only: the 296M net costs no memory or init time here
        net = instantiate(cfg, **derived)
    assert net.image_shape == (channels, size, size)


@pytest.mark.parametrize("out_channels", [1, 2])
def test_patches_are_the_plain_net_on_pixel_unshuffled_images(out_channels):
    """patch_size=2 on [B, 1, 16, 16] is the plain net on torch's pixel_unshuffle (4 channels at 8x8) followed
    by pixel_shuffle of its 4 * out_channels outputs, with the very same weights."""
    patched = UNet(**{**TINY, "out_channels": out_channels, "attention_resolutions": [4], "patch_size": 2})
    plain = UNet(
        **{**TINY, "in_channels": 4, "out_channels": 4 * out_channels, "image_size": 8, "attention_resolutions": [4]}
    )
    perturb_zero_init(patched)
    plain.load_state_dict(patched.state_dict())
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999])
    out = patched(x, t)
    assert out.shape == (3, out_channels, 16, 16)
    expected = torch.nn.functional.pixel_shuffle(plain(torch.nn.functional.pixel_unshuffle(x, 2), t), 2)
    torch.testing.assert_close(out, expected)
    # every pixel of the output sees every pixel of its patch (no pixel is dropped by the folding)
    x.requires_grad_(True)
    patched(x, t)[:, 0, 5, 6].sum().backward()
    assert (x.grad[:, 0, 4:6, 6:8] != 0).all()


def test_patched_classifier_is_the_plain_classifier_on_pixel_unshuffled_images():
    """The classifier task reuses the U-Net's model config, patch_size included: the encoder folds the same way."""
    kwargs = dict(num_classes=10, base_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4])
    patched = NoisyClassifier(in_channels=1, image_size=16, patch_size=2, **kwargs)
    plain = NoisyClassifier(in_channels=4, image_size=8, **kwargs)
    perturb_zero_init(patched)
    plain.load_state_dict(patched.state_dict())
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999])
    logits = patched(x, t)
    assert logits.shape == (3, 10) and logits.abs().max() > 0
    torch.testing.assert_close(logits, plain(torch.nn.functional.pixel_unshuffle(x, 2), t))
    with pytest.raises(ValueError, match=r"patch_size must be a positive divisor of image_size=16, got 3"):
        NoisyClassifier(in_channels=1, image_size=16, patch_size=3, **kwargs)


def test_patches_run_the_levels_at_the_patched_size():
    net = UNet(**{**TINY, "channel_mult": [1, 2, 2], "attention_resolutions": [8], "patch_size": 2})
    sizes = []
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    net(torch.randn(1, 1, 16, 16), torch.tensor([3]))
    assert max(sizes) == 8 and min(sizes) == 2 and net.conv_in.in_channels == 4
