"""Sample from a checkpoint: python sample.py ckpt_path=PATH [mode=grid|trajectory|interpolate|invert]
[num_samples=N] [sampler=ddpm|ddim] [steps=S] [spacing=ddim50] [eta=E] [seed=K] [ema_std=S] [guidance_scale=W]
[class_label=K] [classifier.ckpt_path=PATH classifier.scale=S]; PNG grids go to the run folder.
The modes live in src/sampling/modes.py."""

import hydra
from omegaconf import DictConfig

from src.cli import run_command
from src.sampling.modes import run


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_command(run, cfg)


if __name__ == "__main__":
    main()
