"""Train a diffusion model: python train.py [model=unet_small] [schedule=cosine] [objective=hybrid] ...

Resume a stopped run in its folder: python train.py hydra.run.dir=<run folder> ckpt_path=last [...same overrides].
"""
import os
import signal
import sys

import hydra
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from src.data import DatasetNotFoundError
from src.errors import NonFiniteLossError, RunError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from src.training import run

    try:
        return run(cfg)
    except (RunError, DatasetNotFoundError) as err:
        # A problem with the inputs or the numerics, not a bug: one line, no traceback (unless asked for).
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1 if isinstance(err, NonFiniteLossError) else 2)
    except SIGTERMException:
        # Preempted: last.ckpt was saved (src.callbacks.PreemptionCheckpoint). Exit non-zero like a
        # process ended by SIGTERM, so schedulers do not count the run as finished.
        print(f"stopped by a signal; resume with: python train.py hydra.run.dir={cfg.paths.output_dir} ckpt_path=last "
              f"(and the same overrides)", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
