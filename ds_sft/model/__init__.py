"""The LLaMA-style model, its checkpoints, fp8 and generation.

    config.py        ModelConfig: the model's shape and family switches, two run settings; presets
    llama.py         RMSNorm, RoPE, grouped-query attention, SwiGLU, the decoder; its PROJECTIONS
    attention.py     attention within each packed document, only the tiles a document can see (CPU)
    fused.py         the block's elementwise chains, fused by torch.compile on a GPU
    scoring.py       val metrics per source: the one evaluator of train's evals and ``ds-sft eval``
    fp8.py           fp8 projections: Transformer Engine, or torch._scaled_mm
    fp8_roofline.py  which projections fp8 pays for, by GEMM shape (rates in fp8_roofline.json)
    checkpoint.py    weights in (ds-sft, safetensors, Hugging Face, GGUF, torch files), ds-sft's out
    param_names.py   parameter names between layouts: any LLaMA trainer's -> ds-sft's -> Hugging Face's
    config_inference.py  a checkpoint's ModelConfig, from its own fields and its tensor shapes
    hf_families.py   each family's transformers config <-> ModelConfig
    export.py        the Hugging Face layout of the model's family, as AutoModelForCausalLM loads it
    generate.py      batched greedy generation with a KV cache

Import from the submodules: this package stays import-light so ``ds-sft --help`` does not load torch.
"""
