"""The LLaMA-style model, its checkpoints and generation.

Import from the submodules (``ds_sft.model.llama``, ``.config``, ``.checkpoint``, ``.generate``):
this package stays import-light so ``ds-sft --help`` does not load torch.
"""
