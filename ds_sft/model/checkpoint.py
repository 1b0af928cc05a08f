"""Weights in and out: every checkpoint format ds-sft reads becomes one :class:`LlamaModel`.

``load_model(spec)`` accepts, in the order it tries them:

- a model alias (``smollm2-135m-instruct``, see :mod:`ds_sft.model_source`), resolved to its file;
- a ds-sft directory written by :func:`save_model` (``model.safetensors`` + ``model_config.json``),
  or a training run directory (its ``final/``);
- a Hugging Face directory (``config.json`` + weights) of a supported family (``model_type`` llama,
  qwen2, qwen3, mistral or smollm3), read through transformers;
- a GGUF file, read through transformers (which dequantizes it and un-permutes llama.cpp's Q/K
  rows back into the rotate-half layout; needs the ``gguf`` and ``accelerate`` packages);
- a ``.safetensors`` file (config from a ``model_config.json`` / ``config.json`` beside it, else
  inferred from the tensor shapes);
- a torch file (``.pt``/``.pth``/``.bin``) as nanoGPT-style trainers save it: ``{"model": state_dict,
  "model_args": {...}, "config": {...}, ...}`` or a bare state dict. It is always opened with
  ``torch.load(weights_only=True)``: a pickle naming arbitrary Python objects is refused.

Every state dict goes through :func:`canonical_state_dict`, which accepts the key names of the
common LLaMA codebases (prefixes and renames are listed in :data:`PREFIXES` and :data:`RENAMES`):

    ds-sft / this project     wte  layers.N.attn.{q,k,v,o}_proj  layers.N.mlp.{gate,up,down}_proj
                              layers.N.{attn_norm,mlp_norm}  norm  lm_head
    Hugging Face              model.embed_tokens  model.layers.N.self_attn.*  input_layernorm
                              post_attention_layernorm  model.norm
    Meta / torchtune style    tok_embeddings  layers.N.attention.{wq,wk,wv,wo}
                              feed_forward.{w1 (gate), w3 (up), w2 (down)}  attention_norm  ffn_norm  output
    nanoGPT style             transformer.h.N.  ln_1  ln_2  ln_f  attn.c_attn (fused qkv)  attn.c_proj
    wrappers                  _orig_mod. (torch.compile)  module. (DDP / DeepSpeed)
    fused layouts             attn.{qkv,c_attn,wqkv} rows [q; k; v]; mlp.{gate_up_proj,w12,fc1} [gate; up]

Transformer Engine ``*._extra_state`` entries (fp8 scaling metadata) are set aside on
``model.fp8_extra_state`` (canonical module name -> state) for the fp8 path. Buffers that are
recomputed from the config (``rope_cache``, nanoGPT's causal ``attn.bias``, ``inv_freq`` ...) are
dropped and listed in the log. RoPE comes in two feature layouts that no weight shape reveals; see
``rope_layout`` of :func:`load_model`. Anything else that does not fit is one :class:`UserError` listing the
missing keys, unexpected keys and shape mismatches; a weight holding NaN or Inf is one naming the tensor
(every loss would be NaN from the first step), and so is one that is not a dense float16, bfloat16,
float32 or float64 tensor, or one found under two names with different values. transformers' own
reports of a load ds-sft checks itself (its LOAD REPORT table, its loading progress bar) are silenced.

``save_model`` writes the ds-sft layout; ``to_hf_state_dict`` + ``hf_config`` give the Hugging Face
layout of the model's family (``LlamaForCausalLM``, ``Qwen3ForCausalLM`` ...) that ``ds-sft export``
writes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import pickle
import re
import shlex
import zipfile
from pathlib import Path
from typing import Any

import torch

from ds_sft.errors import UserError, first_line, preview, refused_global
from ds_sft.gguf_file import read_gguf
from ds_sft.model.config import FAMILIES, PRESETS, RUN_SETTINGS, ModelConfig, check_field
from ds_sft.model.llama import LlamaModel, rope_table
from ds_sft.model_source import resolve_model_path
from ds_sft.positions import POSITION_FIELDS
from ds_sft.run_layout import EFFECTIVE_CONFIG, TRAINER_STATE, is_tag, latest_tag, tag_step
from ds_sft.safe_read import read_json_object, refuse_remote_code, require_regular_file
from ds_sft.safe_write import own_folder, replace_file

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"

PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "model.", "transformer.")

# (pattern, replacement), applied in order to each prefix-stripped key.
RENAMES: list[tuple[str, str]] = [
    (r"^(?:embed_tokens|tok_embeddings|token_embedding|embedding)\.", "wte."),
    (r"^(?:h|blocks|layer)\.(\d+)\.", r"layers.\1."),
    (r"\.(?:self_attn|attention)\.", ".attn."),
    (r"\.(?:feed_forward|ffn)\.", ".mlp."),
    (r"\.(?:input_layernorm|attention_norm|ln_1)\.", ".attn_norm."),
    (r"\.(?:post_attention_layernorm|ffn_norm|ln_2)\.", ".mlp_norm."),
    (r"\.attn\.(?:wq|q)\.", ".attn.q_proj."),
    (r"\.attn\.(?:wk|k)\.", ".attn.k_proj."),
    (r"\.attn\.(?:wv|v)\.", ".attn.v_proj."),
    (r"\.attn\.(?:wo|c_proj|out_proj)\.", ".attn.o_proj."),
    (r"\.attn\.(?:c_attn|qkv|wqkv|Wqkv)\.", ".attn.qkv_proj."),
    (r"\.mlp\.w1\.", ".mlp.gate_proj."),
    (r"\.mlp\.w3\.", ".mlp.up_proj."),
    (r"\.mlp\.(?:w2|c_proj)\.", ".mlp.down_proj."),
    (r"\.mlp\.(?:w12|fc1)\.", ".mlp.gate_up_proj."),
    (r"^(?:ln_f|norm_f|final_norm|final_layernorm)\.", "norm."),
    (r"^output\.", "lm_head."),
    (r"norm\.scale$", "norm.weight"),
]

# Buffers that the model recomputes from its config.
RECOMPUTED_BUFFERS = re.compile(
    r"(?:^|\.)(?:rope_cache|freqs_cis|inv_freq|cos_cached|sin_cached|attn\.bias|masked_bias)$"
)

# Names that other trainers give to the fields of ModelConfig (model_args, config.json, ...).
CONFIG_ALIASES: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size", "padded_vocab_size", "n_vocab"),
    "d_model": ("d_model", "n_embd", "dim", "hidden_size"),
    "n_layers": ("n_layers", "n_layer", "num_hidden_layers"),
    "n_heads": ("n_heads", "n_head", "num_attention_heads"),
    "n_kv_heads": ("n_kv_heads", "n_kv_head", "num_key_value_heads", "n_query_groups"),
    "head_dim": ("head_dim", "head_size"),
    "ffn_hidden": ("ffn_hidden", "intermediate_size", "hidden_dim", "ffn_dim", "mlp_hidden"),
    "max_seq_len": POSITION_FIELDS,
    "rope_theta": ("rope_theta", "rope_base", "theta"),
    "norm_eps": ("norm_eps", "rms_norm_eps", "layer_norm_eps"),
    "tie_embeddings": ("tie_embeddings", "tie_word_embeddings", "tie_weights"),
}


# ----------------------------------------------------------------------------- loading


def load_model(
    spec: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config_overrides: dict[str, Any] | None = None,
    rope_layout: str = "auto",
    path: Path | None = None,
) -> LlamaModel:
    """Build a :class:`LlamaModel` from any supported checkpoint (see the module docstring).
    ``path``: ``spec`` resolved already (:func:`resolve_model_path`; online a hub id's resolve asks
    the hub), else resolved here.

    ``rope_layout``: how the checkpoint's trainer paired the rotary features. ``"half"`` (Hugging
    Face, this model: feature i with i + head_dim/2) or ``"interleaved"`` (Meta's original code:
    features 2i and 2i+1), whose Q/K rows are permuted into the half layout on load. ``"auto"``
    takes interleaved when the checkpoint carries Meta's complex ``freqs_cis`` table, else half.
    The two give equally plausible weights and different outputs, so nothing else can tell them
    apart: check a base model's loss on real text after loading it.
    """
    if rope_layout not in ("auto", "half", "interleaved"):
        raise UserError(f"rope_layout {rope_layout!r}: choose auto, half or interleaved")
    path = path or resolve_model_path(str(spec))
    state, config_hints, tie_hint = _read_checkpoint(path)
    try:  # every refusal below is about this file: name it
        state, extra_state, buffers = canonical_state_dict(state)
        config = infer_config(state, config_hints, tie_hint, config_overrides or {})
        with torch.device("meta"):
            model = LlamaModel(config)
        _check_keys(model, state)
        _check_finite(state)
        _check_fits(state, dtype)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    if rope_layout == "interleaved" or (
        rope_layout == "auto" and any(b.is_complex() for b in buffers.values())
    ):
        _interleaved_to_half_rope(state, config)
    mapped = {tensor.untyped_storage().data_ptr() for tensor in state.values()}
    model.load_state_dict(state, strict=True, assign=True)
    model.fp8_extra_state = extra_state
    model.rope_cache = rope_table(config)  # was on meta
    return _owning_its_weights(model.to(device=device, dtype=dtype), mapped)


def _owning_its_weights(model: LlamaModel, mapped: set[int]) -> LlamaModel:
    """``model`` with a copy of every tensor still in the storage it was read into (``mapped``).

    torch.load(mmap=True) and safetensors map the file: a tensor that ``.to()`` did not convert (fp32
    on the CPU) is the file's pages, and a file cut short under it, as ``torch.save`` over the same
    path does while a pretraining run keeps saving its best model, kills the process with SIGBUS at
    the next read. A copy costs one pass over the weights; the mapping's pages are the page cache's."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:  # a tied weight is one parameter
            if tensor.untyped_storage().data_ptr() in mapped:
                tensor.data = tensor.data.clone()
    return model


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """``state`` as a safetensors file, readable as any file this process writes. safetensors
    creates it owner-only (0600) whatever the umask: on a shared cluster nobody else could read
    the final weights or an export."""
    from safetensors.torch import save_file

    replace_file(path, lambda temporary: save_file(state, str(temporary), metadata={"format": "pt"}))


def save_model(model: LlamaModel, directory: str | Path) -> Path:
    """Write ``model.safetensors`` + ``model_config.json`` (what :func:`load_model` reads back).

    Only the LLaMA weights are written: state that layer swaps add (fp8 scaling buffers, TE extra
    state) belongs to training checkpoints, not to the final weights.
    """
    with torch.device("meta"):
        weight_names = set(LlamaModel(model.config).state_dict())
    state = {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if name in weight_names
    }
    if set(state) != weight_names:
        raise ValueError(f"save_model: the model lacks {preview(sorted(weight_names - set(state)))}")
    directory = own_folder(directory)
    save_weights(state, directory / MODEL_FILE)
    model.config.save(directory / CONFIG_FILE)
    return directory


def refuse_training_state(path: Path) -> None:
    """One line for a model path that is a run's training state rather than weights: a run without
    ``final/`` yet, a checkpoint tag, the ``checkpoints/`` folder, its ``latest`` or one of a tag's
    shards. Checked before anything else is looked for beside the model (export asked for a tokenizer
    first, then said the run had no weights)."""
    folder = path.parent if path.is_file() else path
    if any((folder / name).exists() for name in (CONFIG_FILE, "config.json", f"final/{CONFIG_FILE}")):
        return  # a model's weights (a Hugging Face Trainer's checkpoint-N holds a trainer_state.json too)
    if path.is_file() and ((folder / TRAINER_STATE).is_file() or path.name == "latest"):
        raise training_checkpoint(folder)  # one of its shards, or checkpoints/latest
    if not path.is_dir():
        return
    if (path / "checkpoints").is_dir():
        raise UserError(
            f"{path} is a training run without final/ weights yet: let it finish (or resume it to the end), "
            "which writes final/"
        )
    if (path / TRAINER_STATE).is_file() or (path / "latest").is_file():
        raise training_checkpoint(path)


def training_checkpoint(path: Path) -> UserError:
    """What to do with a training checkpoint given as a model: its weights are DeepSpeed's shards (ZeRO
    partitions, optimizer state), which train consolidates into ``final/`` when a run ends, and a run
    resumed from the checkpoint to its own step ends at once. It was refused as "neither a ds-sft
    checkpoint nor a Hugging Face model", with no way named to evaluate the best checkpoint."""
    if not is_tag(path.name) and latest_tag(path):  # the checkpoints/ folder: its newest
        path = path / latest_tag(path)
    step = str(tag_step(path.name)) if is_tag(path.name) else "ITS_STEP"
    settings = path.parent.parent / EFFECTIVE_CONFIG  # the run's: every setting its resume compares
    settings_flag = f" --deepspeed_config {shlex.quote(str(settings))}" if settings.is_file() else ""
    return UserError(
        f"{path} is a training checkpoint (DeepSpeed's shards, not a model's weights): write its weights "
        f"with `ds-sft train --resume {shlex.quote(str(path))} --max_iters {step}{settings_flag} --data_dir "
        "DATA --out_dir NEW` (a run that ends where it starts, writing NEW/final), then pass NEW"
    )


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool | None]:
    """(raw state dict, config fields found beside it, tie_embeddings if the source says so)."""
    refuse_training_state(path)
    if path.is_dir():
        if (path / "final" / CONFIG_FILE).exists():  # a training run directory
            path = path / "final"
        if (path / CONFIG_FILE).exists():
            hints = read_json_object(path / CONFIG_FILE, "ds-sft model config")
            return _read_safetensors(path / MODEL_FILE), _config_hints(hints, path / CONFIG_FILE), None
        if (path / "config.json").exists():
            return _read_transformers(path)
        raise UserError(
            f"{path} is neither a ds-sft checkpoint ({CONFIG_FILE}) nor a Hugging Face model (config.json)"
        )
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        read_gguf(path)
        return _read_transformers(path.parent, gguf_file=path.name)
    if suffix == ".safetensors":
        return _read_safetensors(path), _config_beside(path), None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _read_torch_file(path)
    raise UserError(
        f"unknown checkpoint type {path.name!r}: expected a directory, .pt/.pth/.bin, .safetensors or .gguf"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise UserError(
            f"{path} is missing: a ds-sft checkpoint directory holds {MODEL_FILE} and {CONFIG_FILE}"
        )
    require_regular_file(path, "checkpoint")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise _damaged(path, err) from None


def _config_beside(path: Path) -> dict[str, Any]:
    for name in (CONFIG_FILE, "config.json"):
        if (path.parent / name).exists():
            values = read_json_object(path.parent / name, "model config")
            if "auto_map" in values:
                refuse_remote_code(path.parent)
            return _config_hints(values, path.parent / name)
    return {}


def _config_hints(values: dict[str, Any], source: Path) -> dict[str, Any]:
    """The config fields a checkpoint carries (a config file beside its weights, a torch file's
    ``config``), for :func:`infer_config`. One naming a transformers ``model_type`` is read as
    transformers reads it (``rope_parameters``, ``hidden_act`` ...) and refused unless its family is
    one ds-sft computes: a Gemma's or Granite's weights have LLaMA's names and shapes, and loaded as
    a LLaMA they gave other logits (1.5 and 0.5 away) with exit 0."""
    if "model_type" not in values:
        _check_activation(values.get("hidden_act", SWIGLU_ACTIVATIONS[0]), f"{source}: ")
        return values
    from transformers import AutoConfig

    try:
        hf_cfg = AutoConfig.for_model(**values)
    except Exception as err:  # noqa: BLE001  transformers' validators raise anything
        raise UserError(f"{source}: not a valid config ({first_line(err)})") from None
    return config_from_hf(hf_cfg, where=f"{source}: ").architecture()


def _read_torch_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool | None]:
    require_regular_file(path, "checkpoint")  # a FIFO would hang torch.load, /dev/zero fill the memory
    try:
        # Old Transformer Engine versions pickle their fp8 metadata as io.BytesIO: harmless bytes.
        # mmap needs torch's zip format; files from torch < 1.6 (and bare pickles) are read whole.
        with torch.serialization.safe_globals([io.BytesIO]):
            zipped = zipfile.is_zipfile(path)
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as err:
        raise _pickle_refusal(path, err) from None
    except Exception as err:  # noqa: BLE001  torch's reader on a cut-off or garbled file raises anything
        raise _damaged(path, err) from None
    if not isinstance(checkpoint, dict):
        raise UserError(
            f"{path} holds a {type(checkpoint).__name__}, not a state dict or a dict with a 'model' key"
        )
    for key in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(checkpoint.get(key), dict):
            hints = {}
            for config_key in ("config", "model_config", "model_args"):  # later ones take precedence
                if isinstance(checkpoint.get(config_key), dict):
                    hints.update(checkpoint[config_key])
            return checkpoint[key], _config_hints(hints, path), None
    return checkpoint, {}, None


def _read_transformers(directory: Path, gguf_file: str | None = None):
    """Load through transformers (HF directory or GGUF) and return its state dict and config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if gguf_file is None:
        refuse_remote_code(directory)
        if "quantization_config" in read_json_object(directory / "config.json", "config.json"):
            raise UserError(
                f"{directory}: its weights are quantized (quantization_config); ds-sft trains full "
                "weights: use the model's unquantized release"
            )
    # trust_remote_code=False: never import a folder's own Python, and never ask whether to
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    where = directory / (gguf_file or "")  # the file a GGUF's problems are in, else the folder
    try:
        hf_cfg = AutoConfig.from_pretrained(directory, trust_remote_code=False, **kwargs)
    except Exception as err:  # noqa: BLE001  a hostile config.json makes transformers raise anything
        raise UserError(f"transformers cannot read {where}: {_why(err)}") from None
    config = config_from_hf(hf_cfg, where=f"{where}: ")
    stored = _stored_numbers(directory, gguf_file)
    if (
        stored is not None and config.num_parameters() > stored
    ):  # before transformers builds the config's model in memory
        described = "GGUF metadata describes" if gguf_file else "config.json describes"
        raise UserError(
            f"{where}: its {described} {config.num_parameters():,} weights but its weight files hold at "
            f"most {stored:,}: the config is not these weights'"
        )
    try:
        # output_loading_info: the key problems come back to be checked below, in one line; transformers'
        # own report of them (a LOAD REPORT table on stderr, or a RuntimeError pointing at that table for
        # a wrong shape) and its progress bar stay silent
        with transformers_quiet():
            hf_model, loading = AutoModelForCausalLM.from_pretrained(
                directory,
                dtype=torch.float32,
                trust_remote_code=False,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **kwargs,
            )
    except pickle.UnpicklingError as err:
        raise _pickle_refusal(directory, err) from None
    except Exception as err:  # noqa: BLE001  hostile weights or GGUF metadata make transformers raise anything
        raise UserError(f"transformers cannot load the weights in {where}: {_why(err)}") from None
    # transformers fills a weight the files lack with random values and only logs it: a base model
    # missing one would train from noise, so every weight must come from the files.
    problems = [
        f"{label} {preview(sorted(map(str, loading.get(key) or [])))}"
        for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"))
        if loading.get(key)
    ]
    # transformers' mismatches are (name, shape in the file, shape by the config)
    wrong_shapes = [_wrong_shape(*item) for item in loading.get("mismatched_keys") or []]
    wrong_shapes += _shapes_unlike_config(hf_model, hf_cfg)
    if wrong_shapes:
        problems.append(f"wrong shape: {preview(wrong_shapes)}")
    if problems:
        described = "GGUF metadata" if gguf_file else "config.json"
        raise UserError(f"{where}: its weights do not fit its {described}: " + "; ".join(problems))
    # tied as transformers loaded it, not as the config says: transformers unties a head whose own
    # weight the files hold (a config claiming tied over an untied model lost that head, 1.2 logits off)
    head, embedding = hf_model.get_output_embeddings().weight, hf_model.get_input_embeddings().weight
    return hf_model.state_dict(), config.to_dict(), head is embedding


# The files transformers reads a folder's weights from, in its order of preference: one file, or the
# shards its index names.
HF_WEIGHTS = [
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
]


def _stored_numbers(directory: Path, gguf_file: str | None) -> int | None:
    """At most how many weights the files transformers will read hold, each required to be a regular
    file in the folder (a FIFO shard hung the load forever); None when there are none (transformers'
    own error names the files it looked for).

    transformers builds the model its config describes and fills what the files lack at random: a
    400 KB folder whose config.json claimed 800M weights took 3.6 GB before any check could refuse it.
    A GGUF's tensor infos count its weights; the other formats store at least a byte for each
    (quantized folders are refused before)."""
    if gguf_file is not None:
        return sum(int(tensor.n_elements) for tensor in read_gguf(directory / gguf_file).tensors)
    for single, index in HF_WEIGHTS:
        if (directory / single).exists() or (directory / single).is_symlink():
            files = [directory / single]
        elif (directory / index).exists() or (directory / index).is_symlink():
            files = [directory / shard for shard in _shards(directory / index)]
        else:
            continue
        return sum(require_regular_file(file, "weights").st_size for file in files)
    return None


def _shards(index: Path) -> list[str]:
    """The shard files a weights index names, each a name inside its folder (as transformers requires;
    a hub cache's shards are links out of it, which is fine: the names stay inside)."""
    weight_map = read_json_object(index, index.name).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index}: its weight_map does not map weight names to shard files")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not Path(os.path.normpath(index.parent / shard)).is_relative_to(os.path.normpath(index.parent)):
            raise UserError(f"{index}: names the shard {shard!r}, outside its folder")
    return shards


def _shapes_unlike_config(hf_model, hf_cfg) -> list[str]:
    """``"name (file shape, config shape)"`` for each loaded weight whose shape is not the one its
    config gives (its model built on the meta device).

    Transformers' own report is not enough: given ``ignore_mismatched_sizes``, 5.24 reports such a
    weight as mismatched (and leaves a random one of the config's shape), while 5.17's GGUF path loads
    the file's tensor in its place and reports nothing, which only this comparison sees."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(hf_cfg, trust_remote_code=False).state_dict()
    return [
        _wrong_shape(name, tensor.shape, expected[name].shape)
        for name, tensor in hf_model.state_dict().items()
        if name in expected and tensor.shape != expected[name].shape
    ]


def _wrong_shape(name: str, in_file, by_config) -> str:
    return f"{name} ({tuple(in_file)} in the file, {tuple(by_config)} by its config)"


@contextlib.contextmanager
def transformers_quiet():
    """transformers' logging at errors only and its progress bars off, restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- key names


def canonical_key(key: str) -> str:
    """The ds-sft name of a parameter from any of the supported layouts."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    for pattern, replacement in RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def canonical_state_dict(
    state: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Rename keys, split fused gate-up weights, set aside fp8 extra state and recomputed buffers.

    Returns (weights, TE extra state by module name, buffers the model recomputes).
    """
    out: dict[str, torch.Tensor] = {}
    extra_state: dict[str, Any] = {}
    buffers: dict[str, Any] = {}
    sources: dict[str, str] = {}  # canonical name -> the entry it came from
    for raw_key, value in state.items():
        key = canonical_key(str(raw_key))
        if key.endswith("_extra_state"):
            extra_state[key.rsplit(".", 1)[0]] = value
            continue
        if not isinstance(value, torch.Tensor):
            raise UserError(f"its entry {raw_key!r} is a {type(value).__name__}, not a tensor")
        if RECOMPUTED_BUFFERS.search(key):
            buffers[key] = value
            continue
        problem = _unreadable_weight(value)
        if problem:
            raise UserError(f"its entry {raw_key!r} is {problem}")
        if key.endswith("mlp.gate_up_proj.weight"):
            gate, up = value.chunk(2, dim=0)
            _put(out, sources, key.replace("gate_up_proj", "gate_proj"), gate, str(raw_key))
            _put(out, sources, key.replace("gate_up_proj", "up_proj"), up, str(raw_key))
        else:
            _put(out, sources, key, value, str(raw_key))
    if buffers:
        log.info("ignored %d buffers recomputed from the config: %s", len(buffers), preview(sorted(buffers)))
    if extra_state:
        log.info("kept Transformer Engine _extra_state of %d modules for the fp8 path", len(extra_state))
    return out, extra_state, buffers


# The dtypes a weight is read in (and cast from to the dtype asked for).
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _unreadable_weight(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` cannot be a weight as it is, or None. Sparse and meta tensors, and fp8 ones (which
    need scales ds-sft does not read), failed deep inside torch with a traceback; integer ones would
    be cast to meaningless floats."""
    if tensor.layout != torch.strided:
        return f"a {str(tensor.layout).removeprefix('torch.')} tensor, not a dense one"
    if tensor.is_meta:
        return "a meta tensor, which holds no values: save the model's real weights"
    if tensor.dtype not in WEIGHT_DTYPES:
        kinds = ", ".join(str(dtype).removeprefix("torch.") for dtype in WEIGHT_DTYPES)
        return f"of dtype {str(tensor.dtype).removeprefix('torch.')}: ds-sft reads {kinds} weights"
    return None


def _put(state: dict[str, torch.Tensor], sources: dict[str, str], key: str, tensor, source: str) -> None:
    """``state[key] = tensor``, refused when another entry already gave ``key`` a different value:
    a checkpoint holding a weight under two names (``wte`` and ``model.embed_tokens``, a fused qkv
    beside its q) loaded whichever came last, silently."""
    same = key in state and state[key].dtype == tensor.dtype and state[key].shape == tensor.shape
    if key in state and not (same and torch.equal(state[key], tensor)):
        raise UserError(
            f"its entries {sources[key]!r} and {source!r} are two different values of the weight {key}: "
            "keep one of them"
        )
    state[key], sources[key] = tensor, source


def _split_fused_qkv(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Split each ``attn.qkv_proj.weight`` (rows ordered q, k, v) into the three projections."""
    kv = config.n_kv_heads * config.head_dim
    rows = [config.n_heads * config.head_dim, kv, kv]
    for key in [k for k in state if k.endswith("attn.qkv_proj.weight")]:
        if state[key].ndim != 2 or state[key].shape[0] != sum(rows):
            raise UserError(f"{key} {tuple(state[key].shape)} is not q, k and v of {rows} rows fused")
        q, k, v = state.pop(key).split(rows, dim=0)
        sources = {name: name for name in state}
        for name, tensor in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            _put(state, sources, key.replace("qkv_proj", name), tensor, key)


def _interleaved_to_half_rope(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Reorder each head's Q and K rows from (0, 1), (2, 3) ... pairs to (i, i + head_dim/2) pairs.

    New row i is old row 2i and new row head_dim/2 + i old row 2i + 1: the same rotation, with the
    features laid out the way :func:`ds_sft.model.llama.apply_rope` pairs them. Q and K move alike,
    so every q.k product (and the attention) is unchanged.
    """
    kinds = [("q_proj", config.n_heads), ("k_proj", config.n_kv_heads), ("q_norm", 1), ("k_norm", 1)]
    for name, heads in kinds:  # weights, biases, and the per-feature gains of the q/k norms
        for key in [k for k in state if re.search(rf"attn\.{name}\.(?:weight|bias)$", k)]:
            tensor = state[key]
            rows = tensor.reshape(heads, config.head_dim // 2, 2, -1)
            state[key] = rows.transpose(1, 2).reshape(tensor.shape)
    log.info("permuted Q/K rows from the interleaved RoPE layout to the half layout")


# ----------------------------------------------------------------------------- config


def infer_config(
    state: dict[str, torch.Tensor], hints: dict[str, Any], tie_hint: bool | None, overrides: dict[str, Any]
) -> ModelConfig:
    """Config from the checkpoint's own fields, corrected by the tensor shapes, then ``overrides``.

    Shapes decide the sizes; the fields decide what shapes cannot tell (heads, RoPE theta, eps).
    Splits fused qkv weights in ``state`` once the head layout is known.
    """
    known = ModelConfig.__dataclass_fields__
    # How a run computes (RUN_SETTINGS) is the command's choice, never the file's: a hand-written
    # "kernels": "triton" made eval and export launch Triton on a CPU.
    fields = {
        name: value
        for name, value in hints.items()
        if name in known and name not in RUN_SETTINGS and value is not None
    }
    for name, aliases in CONFIG_ALIASES.items():
        found = [hints[alias] for alias in aliases if hints.get(alias) is not None]
        if name not in fields and found:
            fields[name] = found[0]
    if "wte.weight" not in state:
        raise UserError(
            f"no token embedding among the checkpoint's keys ({preview(sorted(state))}); see "
            "ds_sft.model.checkpoint for the key names it accepts"
        )
    if state["wte.weight"].ndim != 2:
        raise UserError(
            f"its token embedding has shape {tuple(state['wte.weight'].shape)}, not (vocab_size, d_model)"
        )
    fields["vocab_size"], fields["d_model"] = state["wte.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))}
    fields["n_layers"] = max(layers) + 1 if layers else 0
    if "layers.0.mlp.gate_proj.weight" in state:
        fields["ffn_hidden"] = state["layers.0.mlp.gate_proj.weight"].shape[0]
    fields["tie_embeddings"] = "lm_head.weight" not in state if tie_hint is None else tie_hint
    # the family switches that weights reveal (a bare state dict says nothing else)
    fields.setdefault("attention_bias", "layers.0.attn.q_proj.bias" in state)
    fields.setdefault("qk_norm", "layers.0.attn.q_norm.weight" in state)
    if "family" not in fields:
        fields["family"] = "qwen3" if fields["qk_norm"] else "qwen2" if fields["attention_bias"] else "llama"
    fields.update(overrides)
    for name, value in fields.items():  # before the sizes below are computed from them
        check_field(name, value)
    if "n_heads" not in fields:
        fields["n_heads"] = _guess_heads(fields)
    if "head_dim" not in fields:
        fields["head_dim"] = _head_dim_from_weights(state, fields)
    head_dim = fields.get("head_dim") or fields["d_model"] // fields["n_heads"]
    k_proj = state.get("layers.0.attn.k_proj.weight")
    if "n_kv_heads" not in fields and k_proj is not None and k_proj.ndim == 2 and head_dim:
        fields["n_kv_heads"] = k_proj.shape[0] // head_dim
    config = ModelConfig(**fields)
    _split_fused_qkv(state, config)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)  # a tied model saved with both names (HF's state_dict)
    return config


def _head_dim_from_weights(state: dict[str, torch.Tensor], fields: dict[str, Any]) -> int | None:
    """The head width that q's rows reveal (q alone, or q, k and v fused when the key/value heads are
    known); None = d_model // n_heads."""
    q, qkv = state.get("layers.0.attn.q_proj.weight"), state.get("layers.0.attn.qkv_proj.weight")
    if q is not None and q.ndim == 2:
        return q.shape[0] // fields["n_heads"] or None
    if qkv is not None and qkv.ndim == 2 and "n_kv_heads" in fields:
        return qkv.shape[0] // (fields["n_heads"] + 2 * fields["n_kv_heads"]) or None
    return None


def _guess_heads(fields: dict[str, Any]) -> int:
    for preset in PRESETS.values():
        if (preset["d_model"], preset["n_layers"]) == (fields["d_model"], fields["n_layers"]):
            return preset["n_heads"]
    log.warning(
        "the checkpoint does not say its number of heads: assuming head_dim 64 "
        "(pass config_overrides={'n_heads': ...} if that is wrong)"
    )
    return max(1, fields["d_model"] // 64)


def _check_keys(model: LlamaModel, state: dict[str, torch.Tensor]) -> None:
    """Every weight of ``model`` present in ``state`` in its shape, and no other."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        problems = [
            f"{label} ({len(items)}): {preview(items)}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise UserError(f"does not fit ds-sft's LLaMA {model.config.to_dict()}: " + "; ".join(problems))


def _check_finite(state: dict[str, torch.Tensor]) -> None:
    """Every weight finite. A NaN or Inf in a base model makes every loss NaN from the first step,
    which the training loop can only blame on the learning rate; one pass over each tensor at load
    (a boolean temporary the size of the largest tensor) names the damaged one instead."""
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            bad = tensor.numel() - int(torch.isfinite(tensor).sum())
            raise UserError(
                f"its tensor {name} holds {bad:,} NaN/Inf values of {tensor.numel():,}: the checkpoint is "
                "damaged; download, copy or export it again (or resume from an earlier checkpoint)"
            )


def out_of_range(state: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[str, float] | None:
    """The first tensor of ``state`` holding a finite value that becomes inf in ``dtype``, with its
    largest magnitude there; None when every value fits. float16 tops out at 65,504, bfloat16 and
    float32 near 3.4e38: a cast to a narrower range gives inf, without an error from torch."""
    limit = torch.finfo(dtype).max
    for name, tensor in state.items():
        if not tensor.is_floating_point() or not tensor.numel() or torch.finfo(tensor.dtype).max <= limit:
            continue  # nothing to lose: no values, or a cast to a range as wide or wider
        low, high = torch.aminmax(tensor.detach())  # no temporary the size of the tensor
        largest = max(-low.item(), high.item())
        if math.isfinite(largest) and torch.tensor(largest).to(dtype).isinf():
            return name, largest
    return None


def _check_fits(state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Every weight within the range of the dtype asked for: fp32 weights past 65,504 loaded as
    float16 were inf, and every forward NaN, without a word (fp64 ones past 3.4e38, as float32)."""
    found = out_of_range(state, dtype)
    if found is None:
        return
    name, largest = found
    kind = str(dtype).removeprefix("torch.")
    fix = (
        "load it in float32"
        if largest <= torch.finfo(torch.float32).max
        else "no dtype ds-sft computes in holds it: the checkpoint is damaged"
    )
    raise UserError(
        f"its tensor {name} holds {largest:.4g}, past {kind}'s largest value "
        f"({torch.finfo(dtype).max:.5g}): in {kind} it would be inf; {fix}"
    )


def _pickle_refusal(path: Path, err: pickle.UnpicklingError) -> UserError:
    """The refusal of a pickle that torch's weights_only unpickler rejected, with its reason only: the
    rest of torch's message advises weights_only=False, which runs whatever the file names."""
    named = refused_global(err)
    reason = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
    what = (
        f"holds Python objects other than tensors and plain containers (it names {named})"
        if named
        else "is truncated, corrupted or a pickle of Python objects"
        + (f" ({reason.group(1).strip()})" if reason and reason.group(1).strip() else "")
    )
    return UserError(
        f"{path} {what}, and ds-sft only loads checkpoints with torch.load(weights_only=True); "
        "re-save it as a plain state dict or .safetensors"
    )


def _why(err: Exception) -> str:
    """A third-party error in a few words: its first line, after its type where that says more."""
    if isinstance(err, OSError | ValueError):
        return first_line(err)
    return f"{type(err).__name__}: {first_line(err)}"


def _damaged(path: Path, err: Exception) -> UserError:
    return UserError(f"{path} is truncated or corrupted ({first_line(err)}); write or copy it again")


# ----------------------------------------------------------------------------- Hugging Face layout


HF_RENAMES: list[tuple[str, str]] = [
    (r"^wte\.", "model.embed_tokens."),
    (r"^layers\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
    (r"^norm\.", "model.norm."),
]


def to_hf_state_dict(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names (every family's, ``LlamaForCausalLM``'s; tied
    head omitted)."""
    out = {}
    for key, tensor in model.state_dict().items():
        for pattern, replacement in HF_RENAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = tensor
    return out


# transformers' names of the activation in ds-sft's SwiGLU MLP (ACT2FN maps both to SiLU).
SWIGLU_ACTIVATIONS = ("silu", "swish")

# Each family's transformers config and model class.
HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM"),
}


def hf_config(config: ModelConfig, **token_ids: Any):
    """The transformers config of the model's family describing the same network (``LlamaConfig``,
    ``Qwen3Config`` ...; ``bos_token_id=...`` etc. passed on)."""
    import transformers

    config_class, model_class = HF_CLASSES[config.family]
    rope = {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    fields = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rope_parameters=rope,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        hidden_act=SWIGLU_ACTIVATIONS[0],
        architectures=[model_class],
        **token_ids,
    )
    window = config.sliding_window
    layer_types = [
        ("full_attention", "sliding_attention")[config.layer_window(i) is not None]
        for i in range(config.n_layers)
    ]
    if config.family in ("llama", "qwen3", "smollm3"):
        fields.update(attention_bias=False, mlp_bias=False)
    if config.family == "mistral":
        fields.update(sliding_window=window)
    elif config.family in ("qwen2", "qwen3", "smollm3"):
        fields.update(use_sliding_window=window is not None, sliding_window=window, layer_types=layer_types)
    if config.family == "smollm3":
        fields.update(no_rope_layers=[int(config.layer_uses_rope(i)) for i in range(config.n_layers)])
    if config.family in ("qwen2", "qwen3"):
        fields.update(max_window_layers=config.n_layers)  # layer_types decides; this only documents
    return getattr(transformers, config_class)(**fields)


def _check_activation(activation: Any, where: str) -> None:
    """Every family's transformers class computes its MLP with the config's ``hidden_act``: a config
    naming GELU loaded as SwiGLU-silu gave logits 0.01 (gelu) to 0.1 (relu) away from transformers'."""
    if activation not in SWIGLU_ACTIVATIONS:
        raise UserError(
            f"{where}hidden_act {activation!r}: ds-sft's MLP computes SwiGLU with silu only, so it cannot "
            "reproduce this model"
        )


def config_from_hf(hf_cfg, where: str = "") -> ModelConfig:
    """The :class:`ModelConfig` of a transformers config of a supported family (one line if not)."""
    family = hf_cfg.model_type
    if family not in FAMILIES:
        raise UserError(
            f"{where}model_type {family!r} is not supported; ds-sft reads {', '.join(FAMILIES)} models"
        )
    # transformers 5 keeps theta and scaling in rope_parameters (from a 4.x-era config.json too);
    # rope_theta / rope_scaling are read where a config object of another make carries them
    rope = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(
            f"{where}RoPE scaling {rope_type!r} is not supported (ds-sft knows plain RoPE and 'llama3')"
        )
    if getattr(hf_cfg, "mlp_bias", False) or (family != "qwen2" and getattr(hf_cfg, "attention_bias", False)):
        raise UserError(
            f"{where}the model has MLP or output-projection biases; ds-sft supports q/k/v biases only"
        )
    _check_activation(getattr(hf_cfg, "hidden_act", SWIGLU_ACTIVATIONS[0]), where)
    window = getattr(hf_cfg, "sliding_window", None)
    if family in ("qwen2", "qwen3", "smollm3") and not getattr(hf_cfg, "use_sliding_window", False):
        window = None
    layer_types = getattr(hf_cfg, "layer_types", None) if family != "mistral" else None
    try:
        return ModelConfig(
            vocab_size=hf_cfg.vocab_size,
            d_model=hf_cfg.hidden_size,
            n_layers=hf_cfg.num_hidden_layers,
            n_heads=hf_cfg.num_attention_heads,
            n_kv_heads=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
            head_dim=getattr(hf_cfg, "head_dim", None) or None,
            ffn_hidden=hf_cfg.intermediate_size,
            max_seq_len=hf_cfg.max_position_embeddings,
            rope_theta=float(rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))),
            norm_eps=hf_cfg.rms_norm_eps,
            tie_embeddings=bool(hf_cfg.tie_word_embeddings),
            init_std=hf_cfg.initializer_range,
            family=family,
            attention_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            rope_scaling=dict(rope) if rope_type == "llama3" else None,
            sliding_window=window,
            layer_types=list(layer_types) if window is not None and layer_types is not None else None,
            no_rope_layers=list(hf_cfg.no_rope_layers) if family == "smollm3" else None,
        )
    except UserError as err:
        raise UserError(f"{where}{err}") from None
    except (TypeError, ValueError, AttributeError) as err:  # fields of the wrong type in config.json
        raise UserError(f"{where}config.json is not a valid {family} config ({first_line(err)})") from None
