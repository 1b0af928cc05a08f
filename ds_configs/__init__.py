"""DeepSpeed JSON configs shipped with ds-sft (package data, found with ``importlib.resources``).

``sft_recipe.json`` is the seed recipe and what ``ds-sft train`` uses without ``--deepspeed_config``;
the others (zero0-3, offload, bf16) are starting points, each explained by its ``_comment``. Pass one
by name (``--deepspeed_config zero3.json``) from any folder, or a path to your own copy.
"""
