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

Every state dict is renamed to ds-sft's parameter names first (:mod:`ds_sft.model.param_names`: the
names of the common LLaMA codebases, fused layouts split, Transformer Engine ``*._extra_state`` set
aside on ``model.fp8_extra_state`` for the fp8 path, buffers recomputed from the config dropped and
listed in the log), and its config is read from what the checkpoint says of itself, corrected by the
tensor shapes (:mod:`ds_sft.model.config_inference`). RoPE comes in two feature layouts that no weight
shape reveals; see ``rope_layout`` of :func:`load_model`. Anything else that does not fit is one
:class:`UserError` listing the missing keys, unexpected keys and shape mismatches; a weight holding NaN
or Inf is one naming the tensor (every loss would be NaN from the first step), and so is one that is not
a dense float16, bfloat16, float32 or float64 tensor, or one found under two names with different
values. transformers' own reports of a load ds-sft checks itself (its LOAD REPORT table, its loading
progress bar) are silenced.

:func:`read_config` gives the config ``load_model`` builds, with the same key and shape checks, from the
files' config and headers alone (no weight read; a torch file's shapes need its unpickling: None), for
what must be refused before a large model's load.

``save_model`` writes the ds-sft layout; the Hugging Face layout of the model's family that ``ds-sft
export`` writes comes from :func:`~ds_sft.model.param_names.to_hf_state_dict` and
:func:`~ds_sft.model.hf_families.hf_config`.
"""

from __future__ import annotations

import contextlib
import io
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
from ds_sft.model.config import ModelConfig
from ds_sft.model.config_inference import carried_config, infer_config
from ds_sft.model.hf_families import config_from_hf
from ds_sft.model.llama import LlamaModel, rope_table
from ds_sft.model.param_names import canonical_state_dict, interleaved_to_half_rope
from ds_sft.model_source import resolve_model_path
from ds_sft.run_layout import EFFECTIVE_CONFIG, TRAINER_STATE, is_tag, latest_tag, tag_step
from ds_sft.safe_read import read_json_object, refuse_remote_code, require_regular_file
from ds_sft.safe_write import own_folder, replace_file

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


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
    state, extra_state, buffers, model = _fitted(path, *_read_checkpoint(path), config_overrides)
    config = model.config
    try:  # every refusal below is about this file: name it
        _check_finite(state)
        _check_fits(state, dtype)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    if rope_layout == "interleaved" or (
        rope_layout == "auto" and any(b.is_complex() for b in buffers.values())
    ):
        interleaved_to_half_rope(state, config)
    mapped = {tensor.untyped_storage().data_ptr() for tensor in state.values()}
    model.load_state_dict(state, strict=True, assign=True)
    model.fp8_extra_state = extra_state
    model.rope_cache = rope_table(config)  # was on meta
    return _owning_its_weights(model.to(device=device, dtype=dtype), mapped)


def read_config(
    spec: str | Path, config_overrides: dict[str, Any] | None = None, path: Path | None = None
) -> ModelConfig | None:
    """The config :func:`load_model` builds for checkpoint ``spec``, read without a weight: from its
    config files, a safetensors file's header (each tensor's name, dtype and shape) or what
    transformers reads of a Hugging Face folder's ``config.json`` or a GGUF's metadata. The names and
    shapes are checked as the load checks them, so a checkpoint whose weights do not fit is refused
    here as there (but for what only values show: two names of one weight with different values; and
    a Hugging Face head tied as its config says, which transformers unties where the files hold it).
    ``ds-sft train`` reads it before its process group and the weights' load (seconds to minutes for
    a large model).

    None for a torch file (``.pt``, ``.bin`` ...): its shapes lie inside a pickle, which only the load
    unpickles (weights only); the built model is all that says them."""
    path = path or resolve_model_path(str(spec))
    read = _read_checkpoint(path, weights=False)
    return None if read is None else _fitted(path, *read, config_overrides)[3].config


def _fitted(
    path: Path, state: dict[str, torch.Tensor], hints: dict[str, Any], tie: bool | None, overrides
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], LlamaModel]:
    """(``state`` under ds-sft's names, its TE extra state, the buffers the model recomputes, the model
    on the meta device that it fits), its config inferred from ``hints`` and the shapes; a state that
    does not fit is refused naming ``path``."""
    try:
        state, extra_state, buffers = canonical_state_dict(state)
        config = infer_config(state, hints, tie, overrides or {})
        with torch.device("meta"):
            model = LlamaModel(config)
        _check_keys(model, state)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    return state, extra_state, buffers, model


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


def _read_checkpoint(
    path: Path, weights: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool | None] | None:
    """(raw state dict, config fields found beside it, tie_embeddings if the source says so).

    ``weights`` False: no weight is read; each tensor of the state is a stand-in of its dtype and
    shape (:func:`_stand_in`), from a safetensors header or, through transformers, from a config; None
    for a torch file, whose shapes only unpickling it gives."""
    refuse_training_state(path)
    if path.is_dir():
        if (path / "final" / CONFIG_FILE).exists():  # a training run directory
            path = path / "final"
        if (path / CONFIG_FILE).exists():
            hints = read_json_object(path / CONFIG_FILE, "ds-sft model config")
            state = _read_safetensors(path / MODEL_FILE, weights)
            return state, carried_config(hints, path / CONFIG_FILE), None
        if (path / "config.json").exists():
            return _read_transformers(path, weights=weights)
        raise UserError(
            f"{path} is neither a ds-sft checkpoint ({CONFIG_FILE}) nor a Hugging Face model (config.json)"
        )
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        read_gguf(path)
        return _read_transformers(path.parent, gguf_file=path.name, weights=weights)
    if suffix == ".safetensors":
        return _read_safetensors(path, weights), _config_beside(path), None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return _read_torch_file(path) if weights else None
    raise UserError(
        f"unknown checkpoint type {path.name!r}: expected a directory, .pt/.pth/.bin, .safetensors or .gguf"
    )


def _read_safetensors(path: Path, weights: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ``weights`` False: stand-ins (:func:`_stand_in`) from its header."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.exists():
        raise UserError(
            f"{path} is missing: a ds-sft checkpoint directory holds {MODEL_FILE} and {CONFIG_FILE}"
        )
    require_regular_file(path, "checkpoint")
    try:
        if weights:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as file:  # parses the header, checks every extent
            slices = {name: file.get_slice(name) for name in file.keys()}  # noqa: SIM118  (no iterator)
            return {
                name: _stand_in(SAFETENSORS_DTYPES.get(part.get_dtype(), torch.uint8), part.get_shape())
                for name, part in slices.items()
            }
    except SafetensorError as err:
        raise _damaged(path, err) from None


# torch's dtype of each name a safetensors header gives one (the format's spelling). A name not here (a
# packed 4- or 6-bit float) stands in as bytes: no weight is of either kind, and the load refuses both.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _stand_in(dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` that holds one zero (every element is that one, by stride
    0): what renaming, config inference and the key check read of a weight is its kind and shape, and
    a meta tensor would be refused as holding no values."""
    return torch.zeros((), dtype=dtype).expand(tuple(shape))


def _config_beside(path: Path) -> dict[str, Any]:
    for name in (CONFIG_FILE, "config.json"):
        if (path.parent / name).exists():
            values = read_json_object(path.parent / name, "model config")
            if "auto_map" in values:
                refuse_remote_code(path.parent)
            return carried_config(values, path.parent / name)
    return {}


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
            return checkpoint[key], carried_config(hints, path), None
    return checkpoint, {}, None


def _read_transformers(directory: Path, gguf_file: str | None = None, weights: bool = True):
    """Load through transformers (HF directory or GGUF) and return its state dict and config.
    ``weights`` False: the config alone, its model's weights as stand-ins (:func:`_stand_in`; the load
    refuses files whose weights are not of the config's shapes)."""
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
    if not weights:
        with torch.device("meta"):
            shapes = LlamaModel(config).state_dict()
        stand_ins = {name: _stand_in(torch.float32, tensor.shape) for name, tensor in shapes.items()}
        return stand_ins, config.to_dict(), config.tie_embeddings
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


# ------------------------------------------------------------------------------ checks


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
