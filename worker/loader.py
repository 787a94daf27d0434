"""Loading a Hugging Face checkpoint directory (config.json + safetensors) into a pagedserve model."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from worker.attention import AttentionBackend
from worker.models.config import ModelConfig, UnsupportedModelError, parse_dtype
from worker.models.llama import LlamaForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TINY_MODEL_NAME = "tiny"
# dtypes a checkpoint's weights may be stored in: copy_ casts any of them exactly enough
STORED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt; the message names the culprit."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    """The checkpoint directory: "tiny" is the built-in model (written on first use); a
    Hugging Face repo id ("org/name") that is not a local directory is taken from the hub's
    cache, or downloaded into it."""
    if str(name_or_path) == TINY_MODEL_NAME:
        from worker.models.tiny import tiny_model_dir

        return tiny_model_dir()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model path {path} is not a directory: give the checkpoint's "
                             "directory (config.json, *.safetensors, tokenizer files)")
    if _is_repo_id(str(name_or_path)):
        return hub_snapshot(str(name_or_path))
    raise ModelLoadError(f"model directory {path} does not exist (or pass {TINY_MODEL_NAME!r}, "
                         "or a Hugging Face repo id such as Qwen/Qwen2.5-0.5B-Instruct)")


HUB_METADATA = ["*.json", "*.jinja"]  # config, tokenizer, chat template, the weights' index


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub repo's checkpoint files: the cached one if there is one
    (no network), else a download (HF_HUB_OFFLINE=1 forbids it)."""
    from huggingface_hub import constants, snapshot_download

    cached = "nor in the Hugging Face cache"
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=HUB_METADATA,
                                          local_files_only=True))
        if _missing_from(snapshot) is None:
            return snapshot
        # a tokenizer fetched alone, or a model without its tokenizer, leaves a part cached
        cached = "the Hugging Face cache holds only part of it"
    except Exception:  # not cached: fetch it
        pass
    try:
        snapshot = _download(repo_id, snapshot_download)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"model {repo_id!r} is not a local directory, {cached} ({constants.HF_HUB_CACHE}), "
            f"and downloading it failed: {reason}") from None
    missing = _missing_from(snapshot)
    if missing is not None:  # the repo lacks it, or (offline) only the cached part came back
        offline = "; HF_HUB_OFFLINE is set, so nothing was fetched" \
            if constants.HF_HUB_OFFLINE else ""
        raise ModelLoadError(f"model {repo_id!r}: {snapshot} has no {missing}{offline}")
    return snapshot


def _download(repo_id: str, snapshot_download) -> Path:
    """Fetch the files the loader reads, in the order :func:`weight_files` looks for them:
    config and tokenizer, then model.safetensors, else the shards the index names. Not every
    ``*.safetensors``: a repo may hold the weights twice (Mistral's also come as one
    ``consolidated.safetensors`` beside the shards, 14.5 GB more for a 7B model)."""
    snapshot = Path(snapshot_download(repo_id, allow_patterns=HUB_METADATA))
    # the commit the first call found: the repo may move on between calls
    revision = snapshot.name
    snapshot_download(repo_id, allow_patterns=[SINGLE_FILE], revision=revision)
    if not (snapshot / SINGLE_FILE).is_file() and (snapshot / INDEX_FILE).is_file():
        snapshot_download(repo_id, allow_patterns=index_shards(snapshot), revision=revision)
    return snapshot


def _missing_from(snapshot: Path) -> str | None:
    """What a hub snapshot lacks for pagedserve to serve it (the cache lookup answers for any
    files cached under the revision), or None."""
    for name in ("config.json", "tokenizer.json"):
        if not (snapshot / name).is_file():
            return name
    try:
        weight_files(snapshot)
    except ModelLoadError:
        return f"safetensors weights ({SINGLE_FILE} or {INDEX_FILE} and its shards)"
    return None


def _is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def load_config(path: str | Path) -> ModelConfig:
    """Parse ``<path>/config.json``; ModelLoadError if absent or corrupt."""
    raw = read_json(Path(path) / "config.json")
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{Path(path) / 'config.json'} must hold a JSON object")
    return ModelConfig.from_dict(raw)


def read_json(file: Path) -> object:
    if not file.is_file():
        raise ModelLoadError(f"{file} is missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file} is not valid JSON: {exc}") from exc


def load_model(
    path: str | Path, *, dtype: torch.dtype | str | None = None, backend: AttentionBackend
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model for ``path`` ("tiny" or a HF directory) and fill it from its safetensors.

    ``dtype`` None means the checkpoint's declared dtype, else float32. Raises ModelLoadError for a
    missing/corrupt directory, file or tensor, UnsupportedModelError for an architecture we lack.
    """
    directory = resolve_model_path(path)
    config = load_config(directory)
    chosen = parse_dtype(dtype) if dtype is not None else (config.dtype or torch.float32)
    model = LlamaForCausalLM(config, backend, dtype=chosen)
    unused = fill_weights(model.hf_weight_slots(), weight_files(directory))
    _warn_unused(unused, config)
    model = model.to(backend.device).eval()
    model.pack_weights()
    return model, config


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files to read: the single file, else the index's shards. The single
    file wins, as in transformers: saving a checkpoint as one file where a sharded one was
    leaves the old index behind (and deletes its shards)."""
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    index_path = directory / INDEX_FILE
    if not index_path.is_file():
        raise ModelLoadError(f"no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE}")
    shards = [directory / name for name in index_shards(directory)]
    for shard in shards:
        if not shard.is_file():
            raise ModelLoadError(f"{index_path} names shard {shard.name}, which is missing")
    return shards


def index_shards(directory: Path) -> list[str]:
    """The shard file names that ``directory``'s index of weights names, sorted."""
    index_path = directory / INDEX_FILE
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index_path} has no 'weight_map' object naming tensors")
    return sorted({str(shard) for shard in weight_map.values()})


def fill_weights(slots: dict[str, torch.Tensor], files: list[Path]) -> list[str]:
    """Copy every needed tensor into its slot (casting dtype); returns the names of the
    checkpoint's tensors that no slot takes. On a terminal a bar shows the bytes loaded (a 7B
    checkpoint takes a minute on a CPU host)."""
    from tqdm import tqdm

    missing, unused = set(slots), []
    total = sum(slot.nbytes for slot in slots.values())
    with torch.no_grad(), tqdm(total=total, desc="loading weights", unit="B", unit_scale=True,
                               leave=False, disable=None) as bar:
        for file in files:
            for name, tensor in _read_needed(file, missing, unused):
                _copy_checked(slots[name], tensor, name, file)
                missing.discard(name)
                bar.update(slots[name].nbytes)
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint {files[0].parent} lacks {len(missing)} tensor(s): "
                             f"{shown}")
    return unused


def _read_needed(file: Path, needed: set[str], unused: list[str]):
    try:
        with safe_open(file, framework="pt") as reader:
            for name in reader.keys():
                if name in needed:
                    yield name, reader.get_tensor(name)
                else:
                    unused.append(name)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc


def _warn_unused(names: list[str], config: ModelConfig) -> None:
    """Tensors the model does not take are served without, as transformers does; say so,
    since a config.json that does not describe its checkpoint (fewer layers) shows this way.
    Rotary tables and a tied lm_head that some checkpoints also store are expected."""
    names = [n for n in names if not n.endswith("rotary_emb.inv_freq")
             and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if names:
        shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
        log.warning("the checkpoint holds %d tensor(s) the model does not use (%s): does "
                    "config.json describe this checkpoint?", len(names), shown)


def _copy_checked(slot: torch.Tensor, tensor: torch.Tensor, name: str, file: Path) -> None:
    if tensor.dtype not in STORED_DTYPES:  # copy_ would cast it silently (quantized weights)
        raise ModelLoadError(f"tensor {name} in {file.name} has dtype "
                             f"{_name(tensor.dtype)}, expected one of "
                             f"{', '.join(map(_name, STORED_DTYPES))} (quantized checkpoints "
                             "are not supported)")
    if tuple(tensor.shape) != tuple(slot.shape):
        raise ModelLoadError(
            f"tensor {name} in {file.name} has shape {tuple(tensor.shape)}, expected {tuple(slot.shape)}"
        )
    slot.copy_(tensor)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["ModelLoadError", "UnsupportedModelError", "load_model", "load_config", "resolve_model_path"]
