"""Checkpoint loading: dtype choice, fused layout, and an actionable ModelLoadError for each broken input."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.backends import get_backend
from worker.loader import ModelLoadError, load_config, load_model, resolve_model_path
from worker.models import tiny
from worker.models.config import UnsupportedModelError

HIDDEN, HEADS, KV_HEADS, INTER, LAYERS, VOCAB = 32, 4, 2, 48, 2, 50
HEAD_DIM = HIDDEN // HEADS

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128,
    "dtype": "bfloat16",
}


def hf_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,),
            f"{p}.self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            f"{p}.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            f"{p}.self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            f"{p}.mlp.gate_proj.weight": (INTER, HIDDEN),
            f"{p}.mlp.up_proj.weight": (INTER, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, INTER),
        }
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def write_checkpoint(directory: Path, tensors=None, config=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or CONFIG))
    save_file(tensors if tensors is not None else hf_tensors(), str(directory / "model.safetensors"))
    return directory


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in halves.items():
        save_file({n: tensors[n] for n in shard_names}, str(directory / shard))
        weight_map |= {n: shard for n in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def load(path, dtype=None):
    return load_model(path, dtype=dtype, backend=get_backend("cpu"))


# ---- what a good checkpoint loads into ----------------------------------------------------------


def test_weights_land_in_fused_layout(tmp_path):
    """Projections are stored [in, out] (Hugging Face's transposed), contiguous, q/k/v and
    gate/up side by side."""
    tensors = hf_tensors(seed=1)
    model, _ = load(write_checkpoint(tmp_path, tensors), dtype=torch.float32)
    layer = model.layers[1]
    p = "model.layers.1"
    qkv = [tensors[f"{p}.self_attn.{n}_proj.weight"] for n in "qkv"]
    assert torch.equal(layer.qkv_weight, torch.cat(qkv).t())
    gate_up = [tensors[f"{p}.mlp.{n}_proj.weight"] for n in ("gate", "up")]
    assert torch.equal(layer.gate_up_weight, torch.cat(gate_up).t())
    assert torch.equal(layer.o_weight, tensors[f"{p}.self_attn.o_proj.weight"].t())
    assert torch.equal(layer.down_weight, tensors[f"{p}.mlp.down_proj.weight"].t())
    assert all(w.is_contiguous() for w in (layer.qkv_weight, layer.o_weight,
                                           layer.gate_up_weight, layer.down_weight))
    assert torch.equal(model.lm_head, tensors["lm_head.weight"])
    assert all(not p.requires_grad for p in model.parameters())


def test_dtype_defaults_to_config_then_float32(tmp_path):
    model, config = load(write_checkpoint(tmp_path / "bf16"))
    assert config.dtype == torch.bfloat16 and model.embed_tokens.dtype == torch.bfloat16
    no_dtype = {k: v for k, v in CONFIG.items() if k != "dtype"}
    model, _ = load(write_checkpoint(tmp_path / "none", config=no_dtype))
    assert model.embed_tokens.dtype == torch.float32
    model, _ = load(tmp_path / "bf16", dtype=torch.float16)
    assert model.layers[0].qkv_weight.dtype == torch.float16


def test_sharded_checkpoint_equals_single_file(tmp_path):
    tensors = hf_tensors(seed=2)
    single, _ = load(write_checkpoint(tmp_path / "single", tensors), dtype=torch.float32)
    sharded, _ = load(write_sharded(tmp_path / "sharded", tensors), dtype=torch.float32)
    for (name, a), (_, b) in zip(single.named_parameters(), sharded.named_parameters()):
        assert torch.equal(a, b), name


def test_a_single_file_wins_over_a_stale_index_as_in_transformers(tmp_path):
    """save_pretrained into a directory that held a sharded save of the checkpoint deletes the
    old shards but not their index: transformers loads model.safetensors, and so must we."""
    directory = write_sharded(tmp_path, hf_tensors(seed=3))
    for shard in directory.glob("model-*.safetensors"):
        shard.unlink()
    tensors = hf_tensors(seed=4)
    save_file(tensors, str(directory / "model.safetensors"))
    model, _ = load(directory, dtype=torch.float32)
    assert torch.equal(model.lm_head, tensors["lm_head.weight"])


def test_extra_tensors_are_ignored_with_a_warning_unless_expected(tmp_path, caplog):
    expected = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(HEAD_DIM // 2),
                "lm_head.weight": torch.zeros(VOCAB, HIDDEN)}
    tied = {k: v for k, v in hf_tensors().items() if k != "lm_head.weight"} | expected
    model, _ = load(write_checkpoint(tmp_path / "tied", tied,
                                     {**CONFIG, "tie_word_embeddings": True}))
    assert model.config.num_hidden_layers == LAYERS and not caplog.records
    # a config that describes fewer layers than the checkpoint holds is served, but said
    model, _ = load(write_checkpoint(tmp_path / "fewer", config={**CONFIG, "num_hidden_layers": 1}))
    assert model.config.num_hidden_layers == 1
    assert [r.getMessage() for r in caplog.records] == [
        "the checkpoint holds 9 tensor(s) the model does not use (model.layers.1.input_layernorm"
        ".weight, model.layers.1.mlp.down_proj.weight, model.layers.1.mlp.gate_proj.weight, "
        "model.layers.1.mlp.up_proj.weight, model.layers.1.post_attention_layernorm.weight ...): "
        "does config.json describe this checkpoint?"]


def test_tied_embeddings_need_no_lm_head(tmp_path):
    tensors = hf_tensors()
    del tensors["lm_head.weight"]
    model, _ = load(write_checkpoint(tmp_path, tensors, {**CONFIG, "tie_word_embeddings": True}), dtype=torch.float32)
    assert torch.equal(model.lm_head, tensors["model.embed_tokens.weight"])


# ---- each broken input names its culprit --------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere"):
        load(tmp_path / "nowhere")


def test_missing_config(tmp_path):
    write_checkpoint(tmp_path).joinpath("config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        load(tmp_path)


def test_corrupt_config_json(tmp_path):
    write_checkpoint(tmp_path).joinpath("config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json.*not valid JSON"):
        load(tmp_path)


def test_missing_weights(tmp_path):
    write_checkpoint(tmp_path).joinpath("model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load(tmp_path)


def test_corrupt_safetensors(tmp_path):
    weights = write_checkpoint(tmp_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load(tmp_path)


def test_index_naming_missing_shard(tmp_path):
    write_sharded(tmp_path, hf_tensors()).joinpath("model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        load(tmp_path)


@pytest.mark.parametrize("index", [{}, {"weight_map": []}, {"weight_map": {}}])
def test_an_index_naming_no_tensors_is_refused(tmp_path, index):
    write_sharded(tmp_path, hf_tensors()).joinpath("model.safetensors.index.json").write_text(
        json.dumps(index))
    with pytest.raises(ModelLoadError, match="has no 'weight_map' object naming tensors"):
        load(tmp_path)


def test_missing_tensor(tmp_path):
    tensors = hf_tensors()
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelLoadError, match=rf"^checkpoint {tmp_path} lacks 1 tensor\(s\): "
                       r"model\.layers\.1\.mlp\.up_proj\.weight$"):
        load(write_checkpoint(tmp_path, tensors))


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    tensors = hf_tensors()
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(KV_HEADS * HEAD_DIM + 1, HIDDEN)
    with pytest.raises(ModelLoadError) as err:
        load(write_checkpoint(tmp_path, tensors))
    message = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in message
    assert str((KV_HEADS * HEAD_DIM + 1, HIDDEN)) in message and str((KV_HEADS * HEAD_DIM, HIDDEN)) in message


def test_integer_weight_names_tensor_and_dtype(tmp_path):
    """An int32 tensor where a weight belongs was cast and loaded: garbage output, no error."""
    tensors = hf_tensors()
    tensors["model.embed_tokens.weight"] = torch.ones(VOCAB, HIDDEN, dtype=torch.int32)
    with pytest.raises(ModelLoadError, match=r"model\.embed_tokens\.weight in model.*\.safetensors "
                                             r"has dtype int32, expected one of float32, "
                                             r"float16, bfloat16, float64 \(quantized"):
        load(write_checkpoint(tmp_path, tensors))


def test_an_fp8_checkpoint_is_refused_not_served_as_garbage(tmp_path):
    """float8 is a floating-point dtype, so FP8 weights were cast as values (their scales
    dropped as extra tensors) and the model answered garbage with no error."""
    tensors = hf_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(INTER, HIDDEN,
                                                                dtype=torch.float8_e4m3fn)
    with pytest.raises(ModelLoadError, match=r"up_proj\.weight in model\.safetensors has dtype "
                                             r"float8_e4m3fn, expected one of"):
        load(write_checkpoint(tmp_path / "fp8", tensors))
    quantized = {**CONFIG, "quantization_config": {"quant_method": "fp8"}}
    with pytest.raises(UnsupportedModelError, match=r"quantization_config \(quant_method 'fp8'\): "
                                                    "quantized checkpoints are not supported"):
        load(write_checkpoint(tmp_path / "declared", config=quantized))


def test_unsupported_architecture(tmp_path):
    write_checkpoint(tmp_path, config={**CONFIG, "architectures": ["FalconForCausalLM"]})
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM.*LlamaForCausalLM"):
        load(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 0}, "num_attention_heads=0: must be an integer >= 1"),
    ({"vocab_size": "50"}, "vocab_size='50': must be an integer >= 1"),
    ({"rope_parameters": "default"}, "rope_parameters='default': must be an object"),
    ({"rope_parameters": {"rope_type": "linear", "factor": None}}, "rope factor=None"),
    ({"eos_token_id": [2, "x"]}, r"eos_token_id=\[2, 'x'\]: must be a token id"),
    ({"bos_token_id": 1.5}, "bos_token_id=1.5"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps='small': must be a number > 0"),
    ({"rope_theta": -1}, "rope_theta=-1: must be a number > 0"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}}, "rope_theta='1e4'"),
    ({"architectures": "LlamaForCausalLM"},
     "architectures='LlamaForCausalLM': must be a list of class names"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 0},
     "sliding_window=0: must be an integer >= 1"),
])
def test_a_malformed_config_value_is_named_not_a_traceback(tmp_path, change, message):
    # these used to escape as ZeroDivisionError / TypeError from deep in the parse
    write_checkpoint(tmp_path, config={**CONFIG, **change})
    with pytest.raises(UnsupportedModelError, match=message):
        load_config(tmp_path)


def test_an_unset_head_count_or_head_dim_takes_its_default_and_integral_floats_pass(tmp_path):
    write_checkpoint(tmp_path, config={**CONFIG, "num_key_value_heads": None, "head_dim": None,
                                       "max_position_embeddings": 4096.0})
    config = load_config(tmp_path)
    assert (config.num_key_value_heads, config.head_dim) == (HEADS, HEAD_DIM)
    assert config.max_position_embeddings == 4096 and isinstance(config.max_position_embeddings,
                                                                  int)


def test_unsupported_dtype_request(tmp_path):
    with pytest.raises(UnsupportedModelError, match="float64"):
        load(write_checkpoint(tmp_path), dtype=torch.float64)


def test_a_checkpoint_declared_float64_loads_in_the_dtype_asked_or_float32(tmp_path, caplog):
    # its config.json used to be refused whatever dtype was asked for
    path = write_checkpoint(tmp_path, config={**CONFIG, "dtype": "float64"})
    assert load(path)[0].embed_tokens.dtype == torch.float32
    assert "config.json dtype 'float64' is not one pagedserve runs in" in caplog.text
    assert load(path, dtype="bfloat16")[0].embed_tokens.dtype == torch.bfloat16


# ---- the built-in tiny model --------------------------------------------------------------------


def digest(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def test_tiny_is_written_once_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv(tiny.CACHE_ENV, str(tmp_path / "a"))
    first = resolve_model_path("tiny")
    assert first == tmp_path / "a" / tiny.TINY_VERSION
    stamp = {f.name: f.stat().st_mtime_ns for f in first.iterdir()}
    assert resolve_model_path("tiny") == first
    assert {f.name: f.stat().st_mtime_ns for f in first.iterdir()} == stamp  # not rewritten
    monkeypatch.setenv(tiny.CACHE_ENV, str(tmp_path / "b"))
    assert digest(resolve_model_path("tiny")) == digest(first)  # same bytes from scratch
    assert [p.name for p in (tmp_path / "a").iterdir()] == [tiny.TINY_VERSION]  # no staging left
    assert first.stat().st_mode & 0o777 == 0o755  # other users of a shared cache may read it


def test_tiny_loads_through_the_loader(tmp_path, monkeypatch):
    monkeypatch.setenv(tiny.CACHE_ENV, str(tmp_path))
    model, config = load("tiny")
    weights = load_file(str(resolve_model_path("tiny") / "model.safetensors"))
    assert torch.equal(model.lm_head, weights["lm_head.weight"])
    assert config == load_config(resolve_model_path("tiny"))
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (256, 4, 2)
    assert model.embed_tokens.dtype == torch.float32


def test_losing_tiny_writer_keeps_the_winners_copy(tmp_path):
    """A writer that finishes second (the race's loser) discards its staging dir and does not fail."""
    target = tmp_path / tiny.TINY_VERSION
    tiny.write_tiny_checkpoint_atomically(target)
    before = digest(target)
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    tiny.write_tiny_checkpoint_atomically(target)
    assert digest(target) == before
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [tiny.TINY_VERSION]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_loading_shows_a_bar_on_a_terminal_only(monkeypatch, capsys):
    backend = get_backend("cpu")
    load_model("tiny", backend=backend)  # stderr is not a terminal here: silent
    assert capsys.readouterr().err == ""
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    load_model("tiny", backend=backend)
    assert "loading weights: " in terminal.getvalue()


def _hub_cache_with(cache: Path, repo_id: str, files_from: Path) -> None:
    """The Hugging Face hub cache layout of one downloaded revision of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in files_from.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


def test_a_hub_repo_id_loads_from_the_cache_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any download attempt fails
    _hub_cache_with(tmp_path, "example/tiny-llama", tiny.tiny_model_dir())
    path = resolve_model_path("example/tiny-llama")
    assert path.parent.parent.name == "models--example--tiny-llama"
    cached, _ = load_model("example/tiny-llama", backend=get_backend("cpu"))
    builtin, _ = load_model("tiny", backend=get_backend("cpu"))
    for (name, a), (_, b) in zip(cached.named_parameters(), builtin.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ModelLoadError, match=r"^model 'example/absent' is not a local directory, "
                       r"nor in the Hugging Face cache \(.*\), and downloading it failed: "):
        resolve_model_path("example/absent")


@pytest.mark.parametrize("left_out, missing", [
    (".safetensors", r"safetensors weights \(model.safetensors or model.safetensors.index.json"),
    ("tokenizer.json", r"tokenizer.json"),
])
def test_a_hub_repo_cached_in_part_is_not_taken_as_the_checkpoint(tmp_path, monkeypatch,
                                                                  left_out, missing):
    """AutoTokenizer caches config and tokenizer alone, AutoModel no tokenizer; such a snapshot
    was taken whole ("no weights in ...", or no tokenizer) and nothing was fetched. Now a
    download is tried (refused here: offline), and the error names what is missing."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # so the download is seen failing
    partial = tmp_path / "partial"
    partial.mkdir()
    for file in tiny.tiny_model_dir().iterdir():
        if not file.name.endswith(left_out):
            (partial / file.name).write_bytes(file.read_bytes())
    _hub_cache_with(tmp_path / "hub", "example/in-part", partial)
    with pytest.raises(ModelLoadError, match=rf"^model 'example/in-part': .* has no {missing}.*; "
                       r"HF_HUB_OFFLINE is set, so nothing was fetched$"):
        resolve_model_path("example/in-part")


def test_a_hub_download_fetches_only_the_weights_the_loader_reads(tmp_path, monkeypatch):
    """Mistral's repos hold the shards and one consolidated.safetensors of the same weights:
    '*.safetensors' fetched both (14.5 GB more for a 7B model). The hub here is a directory
    served by a stand-in for snapshot_download that copies the files the patterns match."""
    import fnmatch

    import huggingface_hub

    remote = write_sharded(tmp_path / "remote", hf_tensors(seed=4))
    (remote / "tokenizer.json").write_bytes((tiny.tiny_model_dir() / "tokenizer.json").read_bytes())
    save_file(hf_tensors(seed=5), str(remote / "consolidated.safetensors"))
    snapshot, fetched = tmp_path / "snapshot", []

    def snapshot_download(repo_id, allow_patterns, local_files_only=False, revision=None):
        if local_files_only:
            raise FileNotFoundError("not in the cache")
        assert revision in (None, snapshot.name)  # later calls stay on the first one's commit
        snapshot.mkdir(exist_ok=True)
        for file in remote.iterdir():
            if any(fnmatch.fnmatch(file.name, p) for p in allow_patterns):
                (snapshot / file.name).write_bytes(file.read_bytes())
                fetched.append(file.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_model_path("example/sharded") == snapshot
    assert "consolidated.safetensors" not in fetched
    assert sorted(f for f in fetched if f.endswith(".safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    hub, _ = load("example/sharded", dtype=torch.float32)
    local, _ = load(remote, dtype=torch.float32)
    for (name, a), (_, b) in zip(hub.named_parameters(), local.named_parameters(), strict=True):
        assert torch.equal(a, b), name
