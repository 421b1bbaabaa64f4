"""Train a diffusion model: python train.py [model=unet_small] [schedule=cosine] [objective=hybrid] ...

Resume a stopped run in its folder: python train.py hydra.run.dir=<run folder> ckpt_path=last [...same overrides].
"""

import hydra
from omegaconf import DictConfig

from src.cli import run_command
from src.training import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Preempted runs have saved last.ckpt (src.callbacks.PreemptionCheckpoint) before the signal ends them.
    return run_command(
        run,
        cfg,
        resume_hint=f"resume with: python train.py hydra.run.dir={cfg.paths.output_dir} "
        f"ckpt_path=last (and the same overrides)",
    )


if __name__ == "__main__":
    main()
