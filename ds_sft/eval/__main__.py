"""``python -m ds_sft.eval``: the same as ``ds-sft eval``."""

import sys

from ds_sft.command import main_for

if __name__ == "__main__":
    sys.exit(main_for("eval"))
