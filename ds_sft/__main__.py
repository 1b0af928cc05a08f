"""``python -m ds_sft``: the ``ds-sft`` command, where its script is not on PATH (a venv not activated)."""

import sys

from ds_sft.cli import main

if __name__ == "__main__":
    sys.exit(main())
