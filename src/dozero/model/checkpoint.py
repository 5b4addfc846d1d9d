"""Model folders on disk: dozero's own format, Hugging Face's, and training run folders.

A dozero model folder holds

    config.json        {"format": "dozero", "format_version": 1, "model": {ModelConfig fields}, ...metadata}
    model.safetensors  the weights under dozero's names (a tied head is stored once, as tok_emb)
    tokenizer files    whatever `tokenizer.save(folder)` writes

Every file is written atomically (a temporary file in the same folder, then `os.replace`), and
config.json last, so a folder with a config.json is complete. Loading never unpickles: weights
come from safetensors (or, for old Hugging Face folders, `torch.load(weights_only=True)`).

    from dozero.model.checkpoint import load_model, save_model
    save_model(model, "out/my-model", tokenizer=tok, metadata={"step": 5000})
    model = load_model("runs/shakespeare")      # a run folder: runs/shakespeare/best, else latest
    model = load_model("path/to/hf-gpt2")       # a Hugging Face GPT-2 folder
    save_model(model, "out/hf", format="hf")    # readable by transformers.GPT2LMHeadModel
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch

from dozero.config import ModelConfig
from dozero.errors import DozeroError
from dozero.files import atomic_path, removed_if_failed, write_json
from dozero.model.gpt import GPTModel
from dozero.model.quantized import QUANT_KEY, quantized_model_from_state_dict
from dozero.model.sharded import SHARDED_KEY, SHARDS_DIR, read_sharded

MODEL_CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUMS_FILE = "checksums.json"  # written by training checkpoints, verified by load_model when present
FORMAT = "dozero"
FORMAT_VERSION = 1
RUN_SUBFOLDERS = ("best", "latest")  # in order of preference


# ----------------------------------------------------------------------------- files


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise DozeroError(f"{path} not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DozeroError(f"{path} is not valid JSON ({e}); re-save or fix the file") from None
    if not isinstance(obj, dict):
        raise DozeroError(f"{path} should hold a JSON object, found {type(obj).__name__}")
    return obj


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:  # transformers refuses safetensors files without format=pt in their metadata.
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        except SafetensorError as e:
            raise _as_os_error(e, path) from None


def _as_os_error(e: Exception, path: str | Path) -> Exception:
    """safetensors' writer reports the disk's errors (full, read-only) as its own error type, with the
    system's errno only in the text ("... No space left on device (os error 28)"): the OSError it stands
    for, naming `path`, so that the CLI gives its one line. Any other error is returned as it is (a bug)."""
    found = re.search(r"\(os error (\d+)\)", str(e))
    if found is None:
        return e
    code = int(found[1])
    return OSError(code, os.strerror(code), str(path))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise DozeroError(f"{path} not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error type (and OSError) for bad files
        raise DozeroError(f"{path} is truncated or corrupt ({e}); re-save or re-download it") from None


def write_checksums(folder: Path, **extra) -> None:
    """checksums.json: the sha256 of every file in `folder` (plus `extra` JSON fields). Written last,
    so a folder with a checksums.json is complete, and any later change to a file shows on load."""
    from dozero.data.shards import file_sha256

    files = sorted(f for f in Path(folder).iterdir() if f.is_file() and not f.name.startswith("."))
    write_json(
        Path(folder) / CHECKSUMS_FILE,
        {"sha256": {f.name: file_sha256(f) for f in files if f.name != CHECKSUMS_FILE}, **extra},
    )


def verify_checksums(folder: Path, only: tuple[str, ...] | None = None, required: bool = False) -> bool:
    """Check the files of `folder` (or the `only` ones) against its checksums.json; DozeroError naming
    the first damaged or missing file. False when the folder has no checksums.json (written before
    dozero kept them, or by another tool): nothing to check against. `required`: every `only` name
    must be recorded (one that is not was not saved with the folder)."""
    from dozero.data.shards import file_sha256

    folder = Path(folder)
    if not (folder / CHECKSUMS_FILE).exists():
        return False
    recorded = read_json(folder / CHECKSUMS_FILE).get("sha256")
    if not isinstance(recorded, dict):
        raise DozeroError(f"{folder / CHECKSUMS_FILE} is damaged (no 'sha256' table)")
    unrecorded = [name for name in only or () if required and name not in recorded]
    if unrecorded:
        raise DozeroError(f"{folder} is damaged: {CHECKSUMS_FILE} has no sha256 of {unrecorded[0]}")
    for name, digest in recorded.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:  # never read outside the folder
            raise DozeroError(f"{folder / CHECKSUMS_FILE} names '{name}', outside the folder; the file is damaged")
        if only is not None and name not in only:
            continue
        if not (folder / name).is_file():
            raise DozeroError(f"{folder} is damaged: {name} is missing")
        if file_sha256(folder / name) != digest:
            raise DozeroError(f"{folder} is damaged: {name} does not match its sha256 in {CHECKSUMS_FILE}")
    return True


# ----------------------------------------------------------------------------- folders


def resolve_model_dir(path: str | Path) -> Path:
    """The model folder behind `path`: the folder itself, or for a training run RUN/best, else RUN/latest.
    A GGUF file (or a short name of one, e.g. smollm2-135m-instruct) is a model on its own: its path."""
    from dozero.model import gguf

    if gguf.is_gguf(path):
        return gguf.resolve_gguf(path)
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DozeroError(f"model folder '{path}' not found")
    if folder.is_file():
        folder = folder.parent  # a path to config.json or model.safetensors means its folder
    if (folder / MODEL_CONFIG_FILE).is_file():
        return folder
    for sub in RUN_SUBFOLDERS:
        if (folder / sub / MODEL_CONFIG_FILE).is_file():
            return folder / sub
    raise DozeroError(
        f"'{path}' holds no model: expected {MODEL_CONFIG_FILE} + {WEIGHTS_FILE} (a model folder) "
        f"or {' or '.join(s + '/' for s in RUN_SUBFOLDERS)} inside it (a training run folder)"
    )


def model_config_from_dict(d, where: str) -> ModelConfig:
    """Validate a JSON dict (types included) into a ModelConfig, naming the file in every error."""
    if not isinstance(d, dict):
        raise DozeroError(f"{where}: 'model' should be an object of ModelConfig fields")
    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    for key, value in d.items():
        expected = {"int": int, "float": (int, float), "bool": bool}.get(types.get(key, ""), object)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise DozeroError(f"{where}: '{key}' should be {types[key]}, found {value!r}")
    try:
        return ModelConfig.from_dict(d)
    except DozeroError as e:
        raise DozeroError(f"{where}: {e}") from None


def load_config(path: str | Path) -> ModelConfig:
    """Only the ModelConfig of a dozero or Hugging Face folder or a GGUF file (no weights are read)."""
    folder = resolve_model_dir(path)
    if folder.is_file():  # a GGUF file
        from dozero.model.gguf import gguf_model_config

        return gguf_model_config(folder)
    return _read_config(folder)[1]


def _read_config(folder: Path) -> tuple[dict, ModelConfig]:
    from dozero.model import hf

    raw = read_json(folder / MODEL_CONFIG_FILE)
    where = str(folder / MODEL_CONFIG_FILE)
    if raw.get("format") == FORMAT:
        return raw, model_config_from_dict(raw.get("model"), where)
    if hf.is_hf_config(raw):
        try:
            return raw, hf.config_from_hf(raw, where)
        except DozeroError:
            raise
        except Exception as e:  # e.g. a string where a number belongs
            raise DozeroError(f"{where}: bad value in a Hugging Face config ({e})") from None
    raise DozeroError(
        f'{where} is neither a dozero config ("format": "dozero") nor a Hugging Face GPT-2 or Llama config '
        '("model_type": "gpt2" or "llama")'
    )


def load_model(path: str | Path, device=None, dtype=None, keep_quantized: bool = False) -> GPTModel:
    """A GPTModel in eval mode from a dozero folder, a Hugging Face GPT-2 or Llama folder, a run folder, or a
    GGUF file.

    device/dtype: where and in which precision to put it (default: CPU, the stored dtype).
    keep_quantized: a GGUF file's Q8_0 / Q4_0 / Q4_1 matrices stay 8- and 4-bit, run by int8/int4 kernels
    (model/gguf_blocks.py `keep_blocks`); by default they are dequantized to fp32, as Hugging Face does. (A folder of
    `dozero compress quantize` is always run quantized.)
    """
    from dozero.model import hf

    folder = resolve_model_dir(path)
    if folder.is_file():  # a GGUF file: llama.cpp's one-file format, read by way of Hugging Face's names
        from dozero.model.gguf import load_gguf_model

        return load_gguf_model(folder, keep_quantized).to(device=device, dtype=dtype).eval()
    if keep_quantized:
        raise DozeroError(f"--keep-quantized runs a GGUF file's own 4- and 8-bit matrices; {folder} is not a GGUF file")
    verify_checksums(folder, only=(MODEL_CONFIG_FILE, WEIGHTS_FILE))  # a damaged file is an error, not NaN logits
    raw, cfg = _read_config(folder)
    if raw.get("format") == FORMAT and SHARDED_KEY in raw:  # saved by every rank of a sharded run
        where, state = str(folder / SHARDS_DIR), read_sharded(folder, "model/")
    elif raw.get("format") == FORMAT:
        where = str(folder / WEIGHTS_FILE)
        state = read_safetensors(folder / WEIGHTS_FILE)
        if QUANT_KEY in raw:  # int8/int4 weights and their scales (`dozero compress quantize`)
            return quantized_model_from_state_dict(cfg, state, raw[QUANT_KEY], where).to(device=device, dtype=dtype)
    else:
        where = str(folder)
        state = hf.state_dict_from_hf(hf.read_hf_weights(folder), cfg, where)  # may untie cfg's head
    model = model_from_state_dict(cfg, state, where)
    return model.to(device=device, dtype=dtype).eval()


def model_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str) -> GPTModel:
    """Build the model without a random init (meta device) and adopt `state`'s tensors, checking
    every name and shape against `cfg` so a mismatch is one clear message."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_weights and "out_head.weight" not in state and "tok_emb.weight" in state:
        state = {**state, "out_head.weight": state["tok_emb.weight"]}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise DozeroError(f"{where}: the weights do not fit the config ({detail}); is config.json from this model?")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise DozeroError(
                f"{where}: '{name}' has shape {tuple(state[name].shape)} but the config needs {shape}; "
                "config.json does not match the weights"
            )
    model.load_state_dict(state, assign=True)
    if cfg.tie_weights:  # assign=True gave the two names two Parameter objects; make them one again
        model.out_head.weight = model.tok_emb.weight
    model.reset_buffers()  # RoPE's tables are not stored: compute them where the weights now are
    return model


def unwrap(model: torch.nn.Module) -> GPTModel:
    """The GPTModel inside a torch.compile / DistributedDataParallel wrapper."""
    while not isinstance(model, GPTModel):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a GPTModel (or a compiled/DDP wrapper of one), got {type(model).__name__}")
        model = inner
    return model


def check_model_output(folder: Path, force: bool) -> None:
    """Before a command writes a model to `folder` (convert, merge-lora, quantize): refuse one that already
    holds a model, or holds files that are not a model folder's, unless `force`."""
    from dozero.files import check_output_folder

    if (folder / MODEL_CONFIG_FILE).exists() and not force:
        raise DozeroError(f"{folder} already holds a model; choose another folder or pass --force to overwrite it")
    check_output_folder(folder, "model folder", lambda f: (f / MODEL_CONFIG_FILE).exists(), force)


def save_model(
    model, folder: str | Path, tokenizer=None, metadata: dict | None = None, format: str = FORMAT,
    *, hf_tokenizer_files: bool = True,
) -> Path:  # fmt: skip
    """Write `model` (and its tokenizer) to `folder`.

    format="dozero": dozero's folder; `metadata` (JSON-serializable) is stored in config.json.
    format="hf": a Hugging Face GPT-2 folder (`GPT2LMHeadModel.from_pretrained(folder)` loads it), or a
        Llama folder for a Llama-shaped model (`LlamaForCausalLM`); with `tokenizer`, also the files
        `AutoTokenizer.from_pretrained(folder)` reads (`write_hf_tokenizer_files`), unless
        `hf_tokenizer_files=False` (`model convert` copies a Hugging Face source's own).
    """
    model = unwrap(model)
    folder = Path(folder)
    with removed_if_failed(folder):  # a full disk half-way leaves no folder that was not there before
        folder.mkdir(parents=True, exist_ok=True)
        _write_model(model, folder, tokenizer, metadata, format, hf_tokenizer_files)
    return folder


def _write_model(model, folder: Path, tokenizer, metadata: dict | None, format: str, hf_tokenizer_files: bool):
    from dozero.model import hf

    cfg = model.cfg
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if format == "hf":
        tensors = hf.state_dict_to_hf(state, cfg)
        config = hf.config_to_hf(cfg, eos_token_id=getattr(tokenizer, "eot_id", None))
        if metadata:
            config["dozero_metadata"] = metadata
    elif format == FORMAT:
        if cfg.tie_weights:
            state.pop("out_head.weight")  # the same tensor as tok_emb.weight
        tensors = state
        config = dozero_config(cfg, metadata)
    else:
        raise DozeroError(f"unknown model format '{format}'; choose 'dozero' or 'hf'")
    write_safetensors(folder / WEIGHTS_FILE, tensors)
    if tokenizer is not None:
        tokenizer.save(folder)
        if format == "hf" and hf_tokenizer_files:
            write_hf_tokenizer_files(tokenizer, folder, cfg.context_length)
    if format == "hf" and config["eos_token_id"] is not None:
        ids = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        write_json(folder / "generation_config.json", ids)
    write_json(folder / MODEL_CONFIG_FILE, config)


def dozero_config(cfg: ModelConfig, metadata: dict | None) -> dict:
    """config.json of a dozero folder: the format, the ModelConfig, then `metadata`, whose keys may not
    be those nor SHARDED_KEY (it would make the folder read as a sharded checkpoint)."""
    reserved = {"format", "format_version", "model", SHARDED_KEY} & set(metadata or {})
    if reserved:
        raise ValueError(f"metadata may not use the reserved keys {sorted(reserved)}")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.to_dict(), **(metadata or {})}


def write_hf_tokenizer_files(tokenizer, folder: Path, context_length: int) -> list[Path]:
    """tokenizer.json and tokenizer_config.json (its end token and context length) from dozero's tokenizer,
    so that AutoTokenizer and `pipeline` read `folder` with dozero's ids. A vocabulary read from GGUF keeps
    its own pre-tokenizer, control tokens and chat template."""
    from dozero.tokenizer.gguf import GGUFTokenizer, write_hf_tokenizer

    if isinstance(tokenizer, GGUFTokenizer):
        return write_hf_tokenizer(tokenizer, folder, context_length)
    from dozero.tokenizer.exports import export_tokenizer

    return export_tokenizer(tokenizer, folder, "hf", model_max_length=context_length)
