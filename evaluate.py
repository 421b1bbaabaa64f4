"""Evaluate a checkpoint: python evaluate.py ckpt_path=PATH [num_samples=N] [sampler=ddim steps=50] [nll=true]
[extractor=digits] [seeds=[0,1,2]] [ema_std=[0.05,0.1]] [reference=val|judge|FOLDER|FILE.npz]; or score a file of samples:
python evaluate.py samples=FILE.npz [reference=...] [extractor=...]"""

import hydra
from omegaconf import DictConfig

from src.cli import run_command
from src.evaluation import run


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_command(run, cfg)


if __name__ == "__main__":
    main()
