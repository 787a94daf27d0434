"""The daemon's configuration: presets and YAML files loaded into validated, frozen sections.

A config has four sections, ``engine``, ``cluster``, ``scheduler`` and ``http``; every key is
optional and defaults to the value below. Each section checks its own values when it is built,
so a section made in code is held to the same rules as one read from YAML.

This module imports neither torch nor Ray: ``engine_config_kwargs`` hands the engine section to
``worker.engine.EngineConfig`` as plain keyword arguments and the caller builds it.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import yaml

from scheduler.batching import POLICIES
from scheduler.router import ROUTER_NAMES

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_PRESET = "cpu-sim"
# worker.engine.DTYPES and worker.backends.BACKEND_NAMES own these; both modules import torch,
# so the names are repeated here and tests/test_config.py checks that the copies agree.
DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")  # "auto": the checkpoint's
DEVICE_NAMES = ("cpu", "npu", "cuda")


class ConfigError(ValueError):
    """A config the user must fix; the message names the file, the key and what is allowed."""


# -- value rules ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """What one key accepts: a test, the words an error shows, and a normalising conversion."""

    allowed: str
    accepts: Callable[[object], bool]
    convert: Callable[[object], object] = lambda value: value

    def checked(self, name: str, value: object) -> object:
        """``value`` converted, or a ConfigError saying what ``name`` must be."""
        if not self.accepts(value):
            raise ConfigError(f"{name}={value!r}: must be {self.allowed}")
        return self.convert(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_at_least(low: int) -> Rule:
    return Rule(f"an integer >= {low}", lambda v: _is_int(v) and v >= low)


def int_between(low: int, high: int) -> Rule:
    return Rule(f"an integer in [{low}, {high}]", lambda v: _is_int(v) and low <= v <= high)


def number_above(low: float) -> Rule:
    return Rule(f"a finite number > {low:g}", lambda v: _is_number(v) and v > low, float)


def number_at_least(low: float) -> Rule:
    return Rule(f"a finite number >= {low:g}", lambda v: _is_number(v) and v >= low, float)


def one_of(choices: tuple[str, ...]) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices)


def optional(rule: Rule) -> Rule:
    return Rule(f"{rule.allowed}, or null", lambda v: v is None or rule.accepts(v),
                lambda v: None if v is None else rule.convert(v))


TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v))
BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
FRACTION = Rule("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1, float)
TEXT_LIST = Rule("a list of non-empty strings",
                 lambda v: isinstance(v, (list, tuple)) and all(TEXT.accepts(s) for s in v), tuple)
PATH = Rule("a non-empty path string", TEXT.accepts, lambda v: os.path.expanduser(v))


def setting(default: object, rule: Rule):
    """A section field: its default and the rule its value must pass."""
    return field(default=default, metadata={"rule": rule})


class _Section:
    """Validation shared by the section dataclasses (a mixin: it holds no state)."""

    __slots__ = ()
    NAME: ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):
            rule: Rule = f.metadata["rule"]
            value = rule.checked(f"{self.NAME}.{f.name}", getattr(self, f.name))
            object.__setattr__(self, f.name, value)  # frozen: normalise once


# -- sections -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineSection(_Section):
    """worker.engine.EngineConfig without device_index (each worker gets its own device)."""

    NAME: ClassVar[str] = "engine"
    model: str = setting("tiny", TEXT)
    device: str = setting("cpu", one_of(DEVICE_NAMES))
    dtype: str = setting("float32", one_of(DTYPE_NAMES))
    block_size: int = setting(16, int_at_least(1))
    kv_cache_gib: float = setting(1.0, number_above(0))
    memory_utilization: float = setting(0.9, FRACTION)
    max_num_seqs: int = setting(256, int_at_least(1))
    max_num_batched_tokens: int = setting(2048, int_at_least(1))
    max_model_len: int | None = setting(None, optional(int_at_least(1)))
    enable_prefix_caching: bool = setting(True, BOOLEAN)
    enable_chunked_prefill: bool = setting(True, BOOLEAN)
    policy: str = setting("fcfs", one_of(POLICIES))
    seed: int = setting(0, int_at_least(0))


@dataclass(frozen=True, slots=True)
class ClusterSection(_Section):
    """Worker placement and the embedded local Ray cluster."""

    NAME: ClassVar[str] = "cluster"
    simulated_npus: int = setting(2, int_at_least(0))
    worker_num_cpus: float = setting(1.0, number_above(0))
    torch_threads: int = setting(1, int_at_least(1))
    resource_poll_interval_s: float = setting(2.0, number_above(0))


@dataclass(frozen=True, slots=True)
class SchedulerSection(_Section):
    """Admission, routing and the job journal of the scheduler actor."""

    NAME: ClassVar[str] = "scheduler"
    max_queued_jobs: int = setting(1024, int_at_least(1))
    max_waiting_calls: int = setting(16384, int_between(1, 1_000_000))
    max_finished_jobs: int = setting(10_000, int_at_least(1))
    max_finished_gib: float = setting(2.0, number_above(0))
    router: str = setting("least_loaded", one_of(ROUTER_NAMES))
    journal_path: str = setting("~/.cache/pagedserve/journal.msgpack", PATH)
    journal_fsync_interval_s: float = setting(0.05, number_at_least(0))
    worker_stall_timeout_s: float = setting(60.0, number_at_least(0))
    tied_job_claim_s: float = setting(15.0, number_above(0))


@dataclass(frozen=True, slots=True)
class HttpSection(_Section):
    """The HTTP front door."""

    NAME: ClassVar[str] = "http"
    host: str = setting("127.0.0.1", TEXT)
    port: int = setting(8000, int_between(0, 65535))
    api_keys: tuple[str, ...] = setting((), TEXT_LIST)
    max_body_bytes: int = setting(2**20, int_at_least(1))
    # POST requests in progress at once; one more is answered 503 before its body is read
    max_concurrent_requests: int = setting(1024, int_at_least(1))
    # origins whose browser pages may call the API (CORS), e.g. ["https://ui.example.com"],
    # or ["*"]; none by default
    cors_allowed_origins: tuple[str, ...] = setting((), TEXT_LIST)
    # a chat request's own chat_template is Jinja the server runs (sandboxed, yet it may spend
    # its CPU and memory): refused unless every client is trusted that far
    trust_request_chat_template: bool = setting(False, BOOLEAN)


SECTIONS: dict[str, type[_Section]] = {
    cls.NAME: cls for cls in (EngineSection, ClusterSection, SchedulerSection, HttpSection)}


@dataclass(frozen=True, slots=True)
class PagedServeConfig:
    """The whole daemon's config; ``source`` says where it was read from (not compared)."""

    engine: EngineSection = field(default_factory=EngineSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    http: HttpSection = field(default_factory=HttpSection)
    source: str = field(default="<defaults>", compare=False)


# -- loading --------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(source: str | Path | None = None) -> PagedServeConfig:
    """A preset by name ("cpu-sim", "ascend-910b"), a YAML file path, or None for cpu-sim.

    A str with no directory part and no .yaml/.yml suffix is a preset name; anything else,
    and every Path, is a file. Raises ConfigError naming the file for any problem.
    """
    path = _resolve(DEFAULT_PRESET if source is None else source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML{_yaml_problem(exc)}") from None
    return config_from_dict({} if data is None else data, str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load's loader, refusing a key written twice in one mapping (PyYAML keeps the last
    silently, so a second `engine:` section would replace the first). Checked as the file is
    read, before merge keys (``<<: *defaults``) bring in the keys their own mapping overrides."""

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        written = set()
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            if (key.tag, key.value) in written:
                raise yaml.composer.ComposerError(
                    None, None, f"key {key.value!r} is given twice", key.start_mark)
            written.add((key.tag, key.value))
        return node


# YAML 1.1 (PyYAML) reads 1e-3 as a string: only 1.0e-3 is a float there. YAML 1.2 and
# every config writer take both.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, on one line (PyYAML's own message spans several, with a caret)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}"


def config_from_dict(data: object, source: str = "<dict>") -> PagedServeConfig:
    """Validate a nested mapping (as YAML gives it) into a config; errors start with ``source``."""
    try:
        sections = _mapping(data, None, SECTIONS)
        built = {name: _build_section(SECTIONS[name], body) for name, body in sections.items()}
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return PagedServeConfig(**built, source=source)


def config_to_dict(cfg: PagedServeConfig) -> dict:
    """Plain nested dict (lists, not tuples) that ``config_from_dict`` reads back to ``cfg``."""
    return {name: {key: list(value) if isinstance(value, tuple) else value
                   for key, value in asdict(getattr(cfg, name)).items()}
            for name in SECTIONS}


def daemon_config_dict(cfg: PagedServeConfig) -> dict:
    """The settings the daemon runs with, as its status shows them: all but the http section,
    which each HTTP server applies from its own config (and whose API keys no status or log
    line may show)."""
    return {name: values for name, values in config_to_dict(cfg).items()
            if name != HttpSection.NAME}


def with_overrides(cfg: PagedServeConfig, **sections: dict) -> PagedServeConfig:
    """A copy of ``cfg`` with some keys of some sections replaced, validated like a file."""
    data = config_to_dict(cfg)
    for name, values in sections.items():
        data[name].update(values)
    return config_from_dict(data, cfg.source)


def engine_config_kwargs(cfg: PagedServeConfig) -> dict:
    """Keyword arguments for worker.engine.EngineConfig; the caller adds ``device_index``."""
    return asdict(cfg.engine)


def _resolve(source: str | Path) -> Path:
    if isinstance(source, str) and os.sep not in source and "/" not in source \
            and not source.endswith((".yaml", ".yml")):
        path = PRESETS_DIR / f"{source}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown config preset {source!r}; presets: "
                              f"{', '.join(preset_names())} (or give a path to a .yaml file)")
        return path
    return Path(source).expanduser()


def _build_section(cls: type[_Section], body: object) -> _Section:
    known = [f.name for f in fields(cls)]
    return cls(**_mapping({} if body is None else body, cls.NAME, known))


def _mapping(data: object, section: str | None, known: Iterable[str]) -> dict:
    """``data`` as a dict whose keys are all in ``known``; ``section`` None is the top level."""
    known = list(known)
    allowed = ", ".join(known)
    where = "the top level" if section is None else f"section {section!r}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping with keys {allowed}; got {data!r}")
    unknown = [str(key) if section is None else f"{section}.{key}"
               for key in data if key not in known]
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; allowed: {allowed}")
    return dict(data)
