"""Evaluate a checkpoint: python evaluate.py ckpt_path=PATH [num_samples=N] [sampler=ddim steps=50] [nll=true]"""
import os
import sys

import hydra
from omegaconf import DictConfig

from src.data import DatasetNotFoundError
from src.errors import RunError


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from src.evaluation import run

    try:
        run(cfg)
    except (RunError, DatasetNotFoundError) as err:
        # A problem with the inputs (checkpoint, settings, data), not a bug: one line, no traceback.
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
