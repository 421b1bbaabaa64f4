"""Sample from a checkpoint: python sample.py ckpt_path=PATH [mode=grid|trajectory|interpolate|invert]
[num_samples=N] [sampler=ddpm|ddim] [steps=S] [eta=E] [seed=K] [guidance_scale=W] [class_label=K]
[classifier.ckpt_path=PATH classifier.scale=S]; PNG grids go to the run folder."""
import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from src.errors import ConfigError, RunError

log = logging.getLogger(__name__)
MODES = ("grid", "trajectory", "interpolate", "invert")


class SampleConfigError(ConfigError):
    """A bad value in the sample config (one-line message)."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _list(value):
    return OmegaConf.to_container(value) if OmegaConf.is_list(value) else value


def sampler_options(trained: DictConfig, cfg: DictConfig) -> dict:
    """The run's sampler config, then the `sampler=` group chosen here, then steps / eta / spacing."""
    options = OmegaConf.to_container(trained.get("sampler") or {}, resolve=True)
    if cfg.get("sampler") is not None:
        options.update(OmegaConf.to_container(cfg.sampler, resolve=True))
    for key in ("steps", "eta", "spacing"):
        if cfg.get(key) is not None:
            options[key] = _list(cfg[key])
    if isinstance(options.get("spacing"), int):
        options["spacing"] = str(options["spacing"])
    return options


def check_sampling(options: dict, num_timesteps: int, until: int | None = None) -> None:
    """Turn a bad sampler / steps / spacing into one SampleConfigError line before any work starts;
    `until` is the timestep a reverse run starts from when it is not T - 1."""
    from src.diffusion import SAMPLERS
    from src.diffusion.sampling import kept_timesteps_until

    if options.get("sampler") not in SAMPLERS:
        raise SampleConfigError(f"unknown sampler {options.get('sampler')!r}; choose one of {', '.join(SAMPLERS)}")
    until = num_timesteps - 1 if until is None else until
    try:
        kept_timesteps_until(num_timesteps, until, options.get("steps"), options.get("spacing"))
    except ValueError as err:
        raise SampleConfigError(str(err)) from None


def check_interpolation(spec: DictConfig) -> None:
    from src.diffusion.editing import BLENDS

    if spec.encoder not in ("q_sample", "ddim"):
        raise SampleConfigError(f"unknown interpolate.encoder {spec.encoder!r}; choose q_sample or ddim")
    if spec.method not in BLENDS:
        raise SampleConfigError(f"unknown interpolate.method {spec.method!r}; choose one of {', '.join(BLENDS)}")
    if isinstance(spec.num_lambdas, bool) or not isinstance(spec.num_lambdas, int) or spec.num_lambdas < 2:
        raise SampleConfigError(f"interpolate.num_lambdas must be an integer >= 2, got {spec.num_lambdas!r}")


def count(cfg: DictConfig) -> int:
    n = cfg.num_samples if cfg.get("num_samples") is not None else cfg[cfg.mode].num_samples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise SampleConfigError(f"num_samples must be a positive integer, got {n!r}")
    return n


def validation_images(trained: DictConfig, cfg: DictConfig, n: int, device: torch.device) -> torch.Tensor:
    """The first n images [n, C, H, W] in [-1, 1] of the checkpoint's validation split."""
    datamodule = instantiate(OmegaConf.merge(trained.data, cfg.get("data") or {}))
    datamodule.setup("validate")
    dataset = datamodule.val_dataset
    if dataset is None or len(dataset) < n:
        size = 0 if dataset is None else len(dataset)
        raise SampleConfigError(f"mode={cfg.mode} needs {n} validation images, the data has {size}; "
                                f"lower num_samples")
    return torch.stack([dataset[i][0] for i in range(n)]).to(device)


def save(grid: torch.Tensor, path: Path) -> Path:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    log.info("wrote %s", path)
    return path


def labels_and_classifier(cfg: DictConfig, diffusion, net, shape: tuple, device: torch.device):
    """(number of classes to draw rows of, or None for a plain grid; the classifier of classifier guidance or
    None), after checking the guidance settings against the checkpoint."""
    from src.evaluation.guidance import check_classifier_classes, check_guidance, guidance_scales, load_classifier

    num_classes = getattr(net, "num_classes", None)
    scales = guidance_scales(cfg.guidance_scale, num_classes)
    with_classifier = cfg.classifier.ckpt_path is not None
    check_guidance(num_classes, scales, with_classifier, cfg.get("class_label"))
    if cfg.mode != "grid" and (with_classifier or cfg.get("class_label") is not None or any(scales)):
        raise SampleConfigError(f"class_label, guidance_scale and classifier apply to mode=grid, not mode={cfg.mode}")
    if not with_classifier:
        return num_classes, None
    classifier = load_classifier(cfg.classifier.ckpt_path, diffusion, shape, device)
    return check_classifier_classes(classifier, num_classes, cfg.get("class_label")), classifier


def guided_grids(cfg: DictConfig, diffusion, net, shape: tuple, options: dict, device: torch.device,
                 out_dir: Path, num_classes: int, classifier) -> dict[str, Path]:
    """mode=grid with labels: one row per class (or class_label only), one grid per guidance scale, each
    from the same seed so the grids differ only by the guidance."""
    from src.diffusion.sampling import image_grid, sample
    from src.evaluation.guidance import grid_labels, guidance_scales

    per_class = cfg.num_samples if cfg.get("num_samples") is not None else cfg.grid.per_class
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class <= 0:
        raise SampleConfigError(f"grid.per_class must be a positive integer, got {per_class!r}")
    labels = grid_labels(num_classes, per_class, cfg.get("class_label"))
    scales = guidance_scales(cfg.guidance_scale, num_classes)
    written = {}
    for w in scales:
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
        batches = [sample(diffusion, net, (len(y), *shape), generator=generator, device=device, progress=cfg.progress,
                          y=y.to(device), guidance_scale=w, classifier=classifier, classifier_scale=cfg.classifier.scale, **options).cpu()
                   for y in labels.split(cfg.batch_size)]
        name = "samples.png" if len(scales) == 1 else f"samples_w{w:g}.png"
        written[name] = save(image_grid(torch.cat(batches), nrow=per_class), out_dir / name)
    return written


def run(cfg: DictConfig) -> dict[str, Path]:
    """Sample from cfg.ckpt_path in cfg.mode; returns the written files by name."""
    from src.diffusion.editing import ddim_invert, ddim_sample, interpolate, interpolate_ddim
    from src.diffusion.sampling import image_grid, sample, sample_trajectory, trajectory_grid
    from src.evaluation.checkpoint import module_from_checkpoint, read_checkpoint, run_config
    from src.evaluation.compiled import compile_for_sampling, compile_mode

    try:
        ckpt_path = cfg.ckpt_path
    except MissingMandatoryValue:
        raise SampleConfigError("ckpt_path is required: python sample.py ckpt_path=PATH/TO/last.ckpt") from None
    if cfg.mode not in MODES:
        raise SampleConfigError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    n = count(cfg)
    compile_mode(cfg.compile)
    out_dir = Path(cfg.paths.output_dir)
    device = pick_device(cfg.device)

    ckpt = read_checkpoint(ckpt_path, map_location="cpu")
    trained = run_config(ckpt)
    module = module_from_checkpoint(ckpt).to(device)
    del ckpt
    net = module.ema.model if cfg.use_ema else module.net
    compile_for_sampling(net, cfg.compile)
    diffusion = module.diffusion
    options = sampler_options(trained, cfg)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    shape = (net.in_channels, net.image_size, net.image_size)
    spec = cfg.interpolate
    if cfg.mode == "interpolate":
        check_interpolation(spec)
    decodes_from_t = cfg.mode == "interpolate" and spec.encoder == "q_sample"
    if decodes_from_t and not 0 <= spec.t < diffusion.num_timesteps:
        raise SampleConfigError(f"interpolate.t must be in [0, {diffusion.num_timesteps}), got {spec.t}")
    check_sampling(options, diffusion.num_timesteps, until=spec.t if decodes_from_t else None)
    num_classes, classifier = labels_and_classifier(cfg, diffusion, net, shape, device)
    log.info("mode=%s, %d %s, sampler %s, %s weights, on %s", cfg.mode, n,
             "pairs" if cfg.mode == "interpolate" else "images", options, "EMA" if cfg.use_ema else "raw", device)
    start = time.perf_counter()
    written = {}

    if cfg.mode == "grid" and num_classes is not None:
        written.update(guided_grids(cfg, diffusion, net, shape, options, device, out_dir, num_classes, classifier))

    elif cfg.mode == "grid":
        batches = []
        for first in range(0, n, cfg.batch_size):
            size = min(cfg.batch_size, n - first)
            batches.append(sample(diffusion, net, (size, *shape), generator=generator, device=device,
                                  progress=cfg.progress, **options).cpu())
        written["samples"] = save(image_grid(torch.cat(batches), nrow=cfg.grid.nrow), out_dir / "samples.png")

    elif cfg.mode == "trajectory":
        traj = sample_trajectory(diffusion, net, (n, *shape), record_every=cfg.trajectory.record_every,
                                 record_timesteps=_list(cfg.trajectory.record_timesteps), generator=generator,
                                 device=device, progress=cfg.progress, **options)
        log.info("recorded timesteps (columns): %s", traj.timesteps)
        written["pred_x0"] = save(trajectory_grid(traj, "pred_x0"), out_dir / "trajectory_pred_x0.png")
        written["xt"] = save(trajectory_grid(traj, "xt"), out_dir / "trajectory_xt.png")

    elif cfg.mode == "interpolate":
        images = validation_images(trained, cfg, 2 * n, device)
        x_a, x_b = images[:n], images[n:]
        lambdas = torch.linspace(0.0, 1.0, spec.num_lambdas).tolist()
        if spec.encoder == "q_sample":
            mixed = interpolate(diffusion, net, x_a, x_b, lambdas, spec.t, method=spec.method, generator=generator,
                                progress=cfg.progress, **options)
            name = f"interpolate_t{spec.t}_{spec.method}.png"
        else:  # ddim
            mixed = interpolate_ddim(diffusion, net, x_a, x_b, lambdas, method=spec.method, steps=options.get("steps"),
                                     spacing=options.get("spacing"), clip_denoised=options.get("clip_denoised", True),
                                     progress=cfg.progress)
            name = f"interpolate_ddim_{spec.method}.png"
        # rows = pairs: x_a | the decoded blends for each lambda | x_b
        rows = torch.cat([x_a.unsqueeze(1), mixed, x_b.unsqueeze(1)], dim=1)
        written["interpolate"] = save(image_grid(rows), out_dir / name)

    else:  # invert
        if options.get("sampler") != "ddim":
            log.info("mode=invert always uses DDIM with eta=0 (the sampler's steps / spacing are kept)")
        x0 = validation_images(trained, cfg, n, device)
        kwargs = dict(steps=options.get("steps"), spacing=options.get("spacing"),
                      clip_denoised=options.get("clip_denoised", True), progress=cfg.progress)
        latent = ddim_invert(diffusion, net, x0, **kwargs)
        recon = ddim_sample(diffusion, net, latent, **kwargs)
        mse = (recon - x0).pow(2).mean().item()
        log.info("latent mean %.3f std %.3f; reconstruction MSE %.2e (PSNR %.1f dB on [-1, 1])",
                 latent.mean().item(), latent.std().item(), mse, 10 * math.log10(4.0 / max(mse, 1e-12)))
        # rows = images: x_0 | x_T (shown as x_T / 3) | reconstruction
        rows = torch.stack([x0, latent / 3.0, recon], dim=1)
        written["invert"] = save(image_grid(rows), out_dir / "invert.png")

    log.info("done in %.1f s; outputs in %s", time.perf_counter() - start, out_dir.resolve())
    return written


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from src.data import DatasetNotFoundError

    try:
        run(cfg)
    except (RunError, DatasetNotFoundError) as err:
        # A problem with the inputs, not a bug: one line, no traceback (unless asked for).
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
