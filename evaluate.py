"""Evaluate a checkpoint: python evaluate.py ckpt_path=PATH [num_samples=N] [sampler=ddim steps=50] [nll=true]"""
import sys

import hydra
from omegaconf import DictConfig

from src.data import DatasetNotFoundError


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from src.evaluation import EvaluationError, run

    try:
        run(cfg)
    except (EvaluationError, DatasetNotFoundError) as err:  # a setup problem, not a bug: one line
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
