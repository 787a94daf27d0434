"""Daemon config: presets, YAML loading, and errors that name the file, key and allowed values."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import re
from pathlib import Path

import pytest
import yaml

from cluster.config import (DEVICE_NAMES, DTYPE_NAMES, PRESETS_DIR, SECTIONS, ConfigError,
                            EngineSection, PagedServeConfig, config_from_dict, config_to_dict,
                            daemon_config_dict, engine_config_kwargs, load_config, preset_names)

PRESETS = ("cpu-sim", "ascend-910b")


def write_yaml(tmp_path: Path, data: object, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_no_source_is_the_cpu_sim_preset():
    assert load_config() == load_config("cpu-sim")
    assert load_config().source.endswith("cpu-sim.yaml")


def test_cpu_sim_preset_is_the_embedded_default():
    cfg = load_config("cpu-sim")
    e, c = cfg.engine, cfg.cluster
    assert (e.model, e.device, e.dtype, e.block_size, e.kv_cache_gib) == (
        "tiny", "cpu", "float32", 16, 0.5)
    assert (c.simulated_npus, c.torch_threads) == (2, 1)


def test_cpu_sim_preset_differs_from_the_built_in_defaults_only_where_it_says():
    """Its header says so: a config file that omits a key gets these values."""
    preset, built_in = config_to_dict(load_config("cpu-sim")), config_to_dict(PagedServeConfig())
    differ = [(s, k) for s in preset for k in preset[s] if preset[s][k] != built_in[s][k]]
    assert differ == [("engine", "kv_cache_gib")]
    assert "but engine.kv_cache_gib (built in: 1.0" in (PRESETS_DIR / "cpu-sim.yaml").read_text()


def test_ascend_preset_uses_real_npus():
    cfg = load_config("ascend-910b")
    e = cfg.engine
    assert (e.device, e.dtype, e.block_size, e.memory_utilization) == ("npu", "bfloat16", 128, 0.9)
    assert cfg.cluster.simulated_npus == 0


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_lists_and_comments_every_key(preset):
    path = PRESETS_DIR / f"{preset}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert {s: set(keys) for s, keys in raw.items()} == {
        s: set(keys) for s, keys in config_to_dict(PagedServeConfig()).items()}
    key_lines = [line for line in path.read_text().splitlines()
                 if re.match(r"^\s+\w+:", line)]
    assert key_lines and all("#" in line for line in key_lines)


def test_presets_are_discovered_from_the_configs_folder():
    assert set(PRESETS) <= set(preset_names())


def test_engine_section_mirrors_engine_config_fields_and_defaults():
    from worker.backends import BACKEND_NAMES
    from worker.engine import DTYPE_CHOICES, EngineConfig

    ours = {f.name: f.default for f in dataclasses.fields(EngineSection)}
    theirs = {f.name: f.default for f in dataclasses.fields(EngineConfig)
              if f.name != "device_index"}
    assert ours == theirs
    assert DTYPE_NAMES == DTYPE_CHOICES and DEVICE_NAMES == tuple(BACKEND_NAMES)
    for preset in PRESETS:
        engine = EngineConfig(**engine_config_kwargs(load_config(preset)), device_index=3)
        assert engine.block_size == load_config(preset).engine.block_size


def test_omitted_keys_and_sections_take_defaults(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {"engine": {"block_size": 32}}))
    assert cfg.engine.block_size == 32
    defaults = PagedServeConfig()
    assert dataclasses.replace(cfg.engine, block_size=defaults.engine.block_size) == defaults.engine
    assert (cfg.cluster, cfg.scheduler, cfg.http) == (
        defaults.cluster, defaults.scheduler, defaults.http)


def test_an_empty_file_is_all_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == PagedServeConfig()
    assert load_config(str(path)).source == str(path)


@pytest.mark.parametrize("preset", PRESETS)
def test_config_to_dict_round_trips_through_yaml(tmp_path, preset):
    cfg = load_config(preset)
    assert load_config(write_yaml(tmp_path, config_to_dict(cfg))) == cfg


def test_journal_path_is_expanded_and_int_floats_normalised(tmp_path):
    cfg = load_config(write_yaml(tmp_path, {
        "scheduler": {"journal_path": "~/jobs/j.msgpack"},
        "engine": {"kv_cache_gib": 2}, "http": {"api_keys": ["k1", "k2"]}}))
    assert not cfg.scheduler.journal_path.startswith("~")
    assert cfg.scheduler.journal_path == str(Path("~/jobs/j.msgpack").expanduser())
    assert isinstance(cfg.engine.kv_cache_gib, float) and cfg.engine.kv_cache_gib == 2.0
    assert cfg.http.api_keys == ("k1", "k2")


@pytest.mark.parametrize("section", ["top", *SECTIONS])
def test_an_unknown_key_names_it_with_its_section_and_the_allowed_keys(tmp_path, section):
    data = {"bogus_key": 1} if section == "top" else {section: {"bogus_key": 1}}
    path = write_yaml(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    if section == "top":
        assert "bogus_key" in message and ", ".join(SECTIONS) in message
    else:
        allowed = ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))
        assert f"{section}.bogus_key" in message and allowed in message


BAD_VALUES = [
    ("engine", "dtype", "float64", "float32, bfloat16, float16"),
    ("engine", "device", "tpu", "cpu, npu, cuda"),
    ("engine", "block_size", 0, ">= 1"),
    ("engine", "block_size", 16.0, ">= 1"),
    ("engine", "kv_cache_gib", 0, "> 0"),
    ("engine", "kv_cache_gib", float("inf"), "> 0"),
    ("engine", "memory_utilization", 1.5, "(0, 1]"),
    ("engine", "memory_utilization", 0, "(0, 1]"),
    ("engine", "max_num_seqs", -1, ">= 1"),
    ("engine", "max_num_batched_tokens", 0, ">= 1"),
    ("engine", "max_model_len", 0, "or null"),
    ("engine", "policy", "lifo", "fcfs, priority"),
    ("engine", "enable_prefix_caching", "yes please", "true or false"),
    ("engine", "model", "", "non-empty"),
    ("cluster", "simulated_npus", -1, ">= 0"),
    ("cluster", "simulated_npus", True, ">= 0"),
    ("cluster", "worker_num_cpus", 0, "> 0"),
    ("cluster", "torch_threads", 0, ">= 1"),
    ("cluster", "resource_poll_interval_s", 0, "> 0"),
    ("scheduler", "max_queued_jobs", 0, ">= 1"),
    ("scheduler", "router", "random", "least_loaded, round_robin"),
    ("scheduler", "journal_fsync_interval_s", -0.1, ">= 0"),
    ("scheduler", "journal_path", 5, "path"),
    ("http", "port", 70000, "[0, 65535]"),
    ("http", "api_keys", "secret", "list"),
    ("http", "api_keys", ["ok", ""], "list"),
    ("http", "max_body_bytes", 0, ">= 1"),
    ("http", "max_concurrent_requests", 0, ">= 1"),
    ("http", "trust_request_chat_template", "yes", "true or false"),
]


@pytest.mark.parametrize("section,key,value,allowed", BAD_VALUES)
def test_a_bad_value_names_the_key_and_what_is_allowed(tmp_path, section, key, value, allowed):
    path = write_yaml(tmp_path, {section: {key: value}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and f"{section}.{key}=" in message and allowed in message


def test_sections_built_in_code_are_validated_too():
    with pytest.raises(ConfigError, match="engine.block_size"):
        EngineSection(block_size=0)


def test_a_section_that_is_not_a_mapping_is_an_error():
    with pytest.raises(ConfigError, match="section 'cluster' must be a mapping"):
        config_from_dict({"cluster": [1, 2]}, "inline")
    with pytest.raises(ConfigError, match="inline: the top level must be a mapping"):
        config_from_dict(["engine"], "inline")


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(missing)


def test_bad_yaml_is_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("engine: {block_size: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # one line: where the parser stopped and why, not PyYAML's multi-line report
    assert str(info.value) == (f"{path}: not valid YAML at line 2, column 1: expected ',' or "
                               "']', but got '<stream end>'")


@pytest.mark.parametrize("content, problem", [
    (b"engine:\n  model: tiny\nengine:\n  model: other\n",
     "not valid YAML at line 3, column 1: key 'engine' is given twice"),
    (b"engine: {block_size: 16, block_size: 32}\n", "key 'block_size' is given twice"),
    (b"\xff\xfeengine: {}\n", "not UTF-8 text (byte 0)"),
])
def test_a_key_given_twice_or_a_file_not_in_utf8_is_named(tmp_path, content, problem):
    """PyYAML kept the last of two `engine:` sections silently; a UTF-16 file's error did not
    name the file."""
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)


def test_a_character_yaml_refuses_is_one_line(tmp_path):
    """A reader error (a NUL byte) carried PyYAML's second line, '  in "<unicode string>"'."""
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"engine: {}\n\x00\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: not valid YAML: unacceptable character #x0000: "
                               "special characters are not allowed")


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as text: 'kv_cache_gib='1e-3': must be a finite number > 0'."""
    path = tmp_path / "exponents.yaml"
    path.write_text("engine: {kv_cache_gib: 5e-1, max_num_batched_tokens: 4096}\n"
                    "scheduler: {journal_fsync_interval_s: 2E-2}\n")
    cfg = load_config(path)
    assert (cfg.engine.kv_cache_gib, cfg.scheduler.journal_fsync_interval_s) == (0.5, 0.02)
    assert cfg.engine.max_num_batched_tokens == 4096 and type(cfg.engine.max_num_batched_tokens) is int


def test_a_merge_key_may_bring_in_keys_its_mapping_overrides(tmp_path):
    """The first duplicate check refused every `<<:` merge (and keys a merged mapping
    overrides are not written twice)."""
    path = tmp_path / "merged.yaml"
    path.write_text("engine:\n  <<: {model: tiny, block_size: 16}\n  block_size: 32\n")
    cfg = load_config(path)
    assert (cfg.engine.model, cfg.engine.block_size) == ("tiny", 32)


def test_an_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError) as info:
        load_config("cpu-simm")
    assert all(name in str(info.value) for name in PRESETS)


def test_the_daemons_config_leaves_out_the_http_servers_own_and_its_api_keys():
    """`status --json` printed the daemon's config, and a second `up` or `serve` what it did
    not apply, API keys included; yet each HTTP server applies its own http settings."""
    from cluster.bringup import config_differences

    running = daemon_config_dict(config_from_dict({"http": {"api_keys": ["sk-one"]}}, "t"))
    other = config_from_dict({"http": {"api_keys": ["sk-two"], "port": 9000}}, "t")
    assert set(running) == set(SECTIONS) - {"http"}
    assert "sk-" not in repr(running)
    assert config_differences(running, other) == []


def test_loading_a_config_imports_neither_torch_nor_ray():
    code = ("import sys, cluster.config as c; c.load_config(); "
            "assert not {'torch', 'ray'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
