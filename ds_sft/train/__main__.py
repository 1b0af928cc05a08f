"""``python -m ds_sft.train``: how the deepspeed launcher, torchrun and Slurm start the trainer."""

import sys

from ds_sft.command import main_for

if __name__ == "__main__":
    sys.exit(main_for("train"))
