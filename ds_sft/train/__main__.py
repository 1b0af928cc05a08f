"""``python -m ds_sft.train``: how the deepspeed launcher, torchrun and Slurm start the trainer."""

from ds_sft.command import main_for
from ds_sft.train.cli import leave_rank

if __name__ == "__main__":
    try:
        code = main_for("train")
    except SystemExit as stop:  # a rank told to stop with rank 0's refusal (distributed.on_rank_zero)
        code = stop.code
    leave_rank(code)
