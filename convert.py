"""Convert released weights: python convert.py format=diffusers|openai src=SRC dst=DST [preset=NAME]
[direction=export] [+data.root=PATH] [overwrite=true]. diffusers folders / hub ids and openai .pt files become
checkpoints of this project; direction=export writes one of ours as a diffusers DDPMPipeline folder.
The formats live in src/formats/ (conf/convert.yaml, conf/preset/)."""

import hydra
from omegaconf import DictConfig

from src.cli import run_command
from src.conversion import run


@hydra.main(version_base="1.3", config_path="conf", config_name="convert")
def main(cfg: DictConfig) -> None:
    run_command(run, cfg)


if __name__ == "__main__":
    main()
