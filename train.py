"""Train a diffusion model: python train.py [model=unet_small] [schedule=cosine] [objective=hybrid] ..."""
import sys

import hydra
from omegaconf import DictConfig

from src.data import DatasetNotFoundError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from src.training import run

    try:
        return run(cfg)
    except DatasetNotFoundError as err:  # a setup problem, not a bug: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
