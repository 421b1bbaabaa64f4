"""Builds the run of task=classifier: the noisy-image classifier that classifier guidance follows."""
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.errors import ConfigError
from src.lit import ClassifierModule
from src.training import build_diffusion, check_num_classes, config_errors


def build_classifier_module(cfg: DictConfig, datamodule, num_classes: int | None = None) -> ClassifierModule:
    """Classifier + diffusion (whose forward process noises the images) -> ClassifierModule.

    The classifier is the encoder half of the model config's U-Net; its classes are model.num_classes, or
    the data's when that is null. `num_classes` (from a checkpoint's weights) skips asking the data.
    """
    if cfg.get("task") != "classifier":
        raise ConfigError(f"task={cfg.get('task')} builds no classifier; train one with task=classifier")
    diffusion = build_diffusion(cfg)
    if num_classes is None:
        check_num_classes(cfg, datamodule.num_classes)
        num_classes = cfg.model.get("num_classes") or datamodule.num_classes
    derived = {"in_channels": datamodule.channels, "image_size": datamodule.image_size, "num_classes": num_classes}
    with config_errors(f"model (the classifier, built for the data's {datamodule.image_size}x{datamodule.image_size} "
                       f"images with {datamodule.channels} channel(s) and {num_classes} classes)"):
        net = instantiate(cfg.model, **derived)
    with config_errors("module"):
        make_module = instantiate(cfg.module, _partial_=True)
        return make_module(net=net, diffusion=diffusion, run_config=OmegaConf.to_container(cfg, resolve=True))
