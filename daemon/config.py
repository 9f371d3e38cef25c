"""Daemon configuration: defaults < YAML file < OPTD_* environment < command-line overrides.

`load_config` is the one way in; every error comes back as a `ConfigError` whose lines name where the
bad value came from (the file and line, the environment variable, or the command line) and its field
path, so `optd serve` can print it and exit 2.
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

if TYPE_CHECKING:
    from optd.engine.config import EngineConfig

DEFAULT_CONFIG_PATH = Path("/etc/optd/optd.yaml")
ENV_PREFIX = "OPTD_"
ENV_NESTED_DELIMITER = "__"
MIN_TOKEN_LENGTH = 16
SECRET_FIELDS = frozenset({"control_token", "password", "hmac_secret", "url"})   # values never echoed


class ConfigError(ValueError):
    """Invalid configuration; each line of the message names a source, a field path and the problem."""


class _FieldError(ValueError):
    """A cross-field check's failure that knows which field it is about (pydantic reports such
    errors at the model's root; the formatter moves them to `loc`)."""

    def __init__(self, loc: tuple[str, ...], message: str):
        super().__init__(message)
        self.loc = loc


_SECTION = ConfigDict(extra="forbid", frozen=True)


class EngineSection(BaseModel):
    """Start-up envelope of the engine; the policy moves knobs inside it (see optd.engine.EngineConfig)."""

    model_config = _SECTION

    model: str = "demo"
    draft_model: str | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_spec_length: int = Field(8, ge=0)
    # ByteSize so the file can say "8GiB"; the engine wants bytes.
    kv_cache_memory: ByteSize | None = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    cuda_graphs: bool = True


class KnobsSection(BaseModel):
    """Start values of the four knobs; None leaves the engine's own. Without a policy they stay put
    (unless pinned)."""

    model_config = _SECTION

    spec_length: int | None = Field(None, ge=0)
    kv_compression: float | None = Field(None, ge=0, lt=1)
    weight_bits: float | None = Field(None, ge=4, le=16)
    max_batch_size: int | None = Field(None, ge=1)


class ServerSection(BaseModel):
    model_config = _SECTION

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)     # 0: any free port
    max_waiting: int = Field(256, ge=0)         # waiting requests beyond this get 429 + Retry-After
    # SecretStr keeps the token out of reprs, logs and error messages.
    control_token: SecretStr | None = None
    drain_timeout_s: float = Field(30.0, ge=0)

    @field_validator("control_token")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().strip()) < MIN_TOKEN_LENGTH:
            raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} characters (or unset to generate one)")
        return v


class StoreSection(BaseModel):
    model_config = _SECTION

    url: str | None = None                       # SQLAlchemy URL; None: sqlite in the state directory
    raw_retention_s: float = Field(7 * 86400.0, gt=0)
    flush_interval_s: float = Field(1.0, gt=0)

    def database_url(self, state_dir: Path) -> str:
        return self.url or f"sqlite:///{state_dir / 'optd.db'}"


class TelemetrySection(BaseModel):
    model_config = _SECTION

    interval_s: float = Field(1.0, gt=0)
    ring_buffer_s: float = Field(3600.0, gt=0)
    # Seconds between quality probes when no policy runs (a policy's spec.quality_probe_every wins);
    # null: only after a change of kv_compression or weight_bits (and once at start).
    quality_probe_every_s: float | None = Field(300.0, gt=0)


class SloSection(BaseModel):
    """Latency objectives a finished request must meet for its tokens to count in the telemetry's
    `goodput_tokens_per_s` (seconds; null leaves that bound unchecked). Defaults: the balanced policy's."""

    model_config = _SECTION

    ttft_p95_s: float | None = Field(0.8, gt=0)
    itl_p95_s: float | None = Field(0.06, gt=0)


MQTT_SCHEMES = {"mqtt": 1883, "mqtts": 8883}     # scheme -> default port


class MqttSection(BaseModel):
    """The MQTT bridge (optd.daemon.mqtt): topics under `<topic_prefix>/<node>/`."""

    model_config = _SECTION

    url: str | None = None                       # mqtt[s]://[user:pass@]host[:port]; None: no MQTT
    node: str = Field(default_factory=socket.gethostname)
    client_id: str | None = Field(None, min_length=1, max_length=128)   # None: the node name
    username: str | None = None                  # wins over a user name in the URL
    password: SecretStr | None = None            # wins over a password in the URL
    tls_ca_file: Path | None = None              # CA bundle to verify the broker by; turns TLS on
    tls_insecure: bool = False                   # TLS without verifying the broker's certificate
    topic_prefix: str = "optd/v1"
    commands: bool = False                       # accept cmd/set (node and fleet-wide) at all
    hmac_secret: SecretStr | None = None         # commands must then carry `ts` and `hmac`
    hmac_window_s: float = Field(30.0, gt=0)     # how far a command's `ts` may be from our clock
    queue_size: int = Field(1000, ge=1)          # outgoing messages held while slow or disconnected
    keepalive_s: int = Field(30, ge=5)           # the broker declares us gone after 1.5x this
    reconnect_max_s: float = Field(30.0, gt=0)   # cap of the exponential reconnect backoff

    @field_validator("node")
    @classmethod
    def _one_topic_level(cls, v: str) -> str:
        # Topics are optd/v1/<node>/...: a separator or wildcard in the name would break the tree.
        if not v or any(c in v for c in "/+#") or any(c.isspace() for c in v):
            raise ValueError("must be a non-empty MQTT topic level: no '/', '+', '#' or spaces")
        if v == "all":
            raise ValueError("'all' is the fleet-wide topic level (<prefix>/all/cmd/set), not a node name")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, v: str) -> str:
        levels = v.split("/")
        if not v or any(not level or any(c in level for c in "+#") for level in levels):
            raise ValueError(f"must be topic levels joined by '/', no wildcards or empty levels, got {v!r}")
        return v

    @field_validator("url")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        if v is not None:
            broker_address(v)   # raises ValueError with what is wrong
        return v

    @field_validator("tls_ca_file")
    @classmethod
    def _tls_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"no such file: {v}")
        return v


def broker_address(url: str) -> tuple[str, str, int, str | None, str | None]:
    """(scheme, host, port, user, password) of an mqtt:// or mqtts:// URL; ValueError naming the problem."""
    parsed = urlsplit(url)
    if parsed.scheme not in MQTT_SCHEMES:
        raise ValueError(f"must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got scheme {parsed.scheme!r}")
    try:
        port = parsed.port
    except ValueError:
        raise ValueError("has an invalid port (mqtt://HOST[:PORT], PORT in 0..65535)") from None
    if not parsed.hostname:
        raise ValueError("has no host (mqtt://HOST[:PORT])")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise ValueError("must not have a path, query or fragment (topics come from mqtt.topic_prefix)")
    return (parsed.scheme, parsed.hostname, port or MQTT_SCHEMES[parsed.scheme],
            unquote(parsed.username) if parsed.username else None,
            unquote(parsed.password) if parsed.password else None)


class DaemonConfig(BaseSettings):
    """The whole daemon configuration. Build it with `load_config`; `DaemonConfig()` alone gives
    defaults < environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER,
                                      extra="forbid", frozen=True)

    engine: EngineSection = EngineSection()
    knobs: KnobsSection = KnobsSection()
    server: ServerSection = ServerSection()
    store: StoreSection = StoreSection()
    telemetry: TelemetrySection = TelemetrySection()
    slo: SloSection = SloSection()
    policy: str | None = None                    # policy file path or preset name; None: no policy
    mqtt: MqttSection = Field(default_factory=MqttSection)

    @model_validator(mode="after")
    def _knobs_within_envelope(self) -> DaemonConfig:
        # Caught here rather than rejected by the engine at start, so the error names the config field.
        k, e = self.knobs, self.engine
        if k.spec_length and e.draft_model is None:
            raise _FieldError(("knobs", "spec_length"), "needs engine.draft_model (no drafter configured)")
        if k.spec_length is not None and k.spec_length > e.max_spec_length:
            raise _FieldError(("knobs", "spec_length"),
                              f"{k.spec_length} exceeds engine.max_spec_length ({e.max_spec_length})")
        if k.max_batch_size is not None and k.max_batch_size > e.max_num_seqs:
            raise _FieldError(("knobs", "max_batch_size"),
                              f"{k.max_batch_size} exceeds engine.max_num_seqs ({e.max_num_seqs})")
        return self

    def engine_config(self) -> EngineConfig:
        # Imported here: optd.engine pulls in torch, which CLI clients reading the config do not need.
        from optd.engine.config import EngineConfig

        e = self.engine
        return EngineConfig(model=e.model, draft_model=e.draft_model, device=e.device, dtype=e.dtype,
                            max_model_len=e.max_model_len, max_num_seqs=e.max_num_seqs,
                            max_spec_length=e.max_spec_length,
                            kv_cache_memory=None if e.kv_cache_memory is None else int(e.kv_cache_memory),
                            gpu_memory_utilization=e.gpu_memory_utilization, cuda_graphs=e.cuda_graphs)


# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None, *,
                default_path: Path = DEFAULT_CONFIG_PATH, defaults: Mapping[str, Any] | None = None
                ) -> DaemonConfig:
    """Defaults < `defaults` < `path` (else `default_path` if it exists) < OPTD_* environment < `overrides`.

    `overrides` and `defaults` are nested like the file ({"server": {"port": 9000}}); None values in
    `overrides` mean "flag not given" and are dropped, so a CLI can pass every flag unconditionally.
    `defaults` replaces built-in defaults (as `serve --demo` does) without outranking any source.
    """
    if path is None and default_path.is_file():
        path = default_path
    file_data, file_node = _read_yaml(path) if path is not None else ({}, None)
    try:
        env_data = EnvSettingsSource(DaemonConfig)()
    except SettingsError as e:                   # e.g. OPTD_SERVER='{not json'
        raise ConfigError(f"environment: {e}") from None
    flags = _drop_none(overrides or {})
    merged = _merge(_merge(_merge(defaults or {}, file_data), env_data), flags)
    try:
        # The environment is read again underneath `merged`; harmless, as `merged` already holds it.
        return DaemonConfig.model_validate(merged)
    except ValidationError as e:
        sources = _Sources(path, file_data, file_node, env_data, flags)
        raise ConfigError("\n".join(_describe(err, sources) for err in e.errors())) from None


def _read_yaml(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    # One parse gives both the data and the node tree whose marks locate keys for error messages.
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: the top level must be a mapping of sections")
    _check_duplicates(path, node)
    return data, node


def _check_duplicates(path: Path, root: yaml.Node) -> None:
    # PyYAML keeps the last of two equal keys without a word; in a config that hides a mistake.
    seen_nodes: set[int] = set()

    def walk(node: yaml.Node, where: str) -> None:
        if id(node) in seen_nodes:          # aliases may share (or loop back to) a node
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                key = f"{where}.{k.value}" if where else str(k.value)
                if isinstance(k, yaml.ScalarNode):
                    line = k.start_mark.line + 1
                    if k.value in first:
                        raise ConfigError(f"{path}:{line}: {key}: duplicate key "
                                          f"(first at line {first[k.value]})")
                    first[k.value] = line
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{where}.{i}")

    walk(root, "")


class _Sources:
    """What each source said, to tell which one an error's value came from."""

    def __init__(self, path: Path | None, file_data: dict, file_node: yaml.Node | None,
                 env_data: dict, flags: dict):
        self.path, self.file_data, self.file_node = path, file_data, file_node
        self.env_data, self.flags = env_data, flags

    def where(self, loc: tuple[str | int, ...]) -> str:
        # Highest precedence first, the full path before its prefixes: a missing-field error sits
        # under a section that some source supplied.
        for n in range(len(loc), -1, -1):
            if n and _has(self.flags, loc[:n]):
                return "command line"
            if n and _has(self.env_data, loc[:n]):
                return f"environment {self._env_name(loc[:n])}"
            if self.path is not None and _has(self.file_data, loc[:n]):
                line = _line_of(self.file_node, loc[:n])
                return f"{self.path}:{line}" if line else str(self.path)
        return str(self.path) if self.path is not None else "config"

    @staticmethod
    def _env_name(loc: tuple[str | int, ...]) -> str:
        present = {k.upper() for k in os.environ}
        for n in range(len(loc), 0, -1):
            name = (ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(p) for p in loc[:n])).upper()
            if name in present:
                return name
        return ENV_PREFIX + "*"


def _describe(err: Mapping[str, Any], sources: _Sources) -> str:
    loc: tuple[str | int, ...] = tuple(err["loc"])
    msg = err["msg"]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        loc, msg = cause.loc, str(cause)
    elif err["type"] == "extra_forbidden":
        msg = _unknown_key(loc)
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif not SECRET_FIELDS & set(loc) and _is_short_scalar(err.get("input")):
        msg = f"{msg} (got {err['input']!r})"     # never echo a secret
    field = ".".join(str(p) for p in loc)
    return f"{sources.where(loc)}: {field}: {msg}" if field else f"{sources.where(loc)}: {msg}"


def _unknown_key(loc: tuple[str | int, ...]) -> str:
    model: type[BaseModel] | None = DaemonConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is None:
        return "unknown key"
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
    return f"unknown key {loc[-1]!r} ({hint})"


def _is_short_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) and len(repr(value)) <= 80


def _line_of(node: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """1-based line of the deepest key of `loc` present in the YAML tree (its section's if the key
    itself is missing), or None."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)]
            if not match:
                break
            key_node, node = match[-1]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _has(data: Any, loc: tuple[str | int, ...]) -> bool:
    for part in loc:
        if isinstance(data, Mapping):
            found = part in data
        else:
            found = isinstance(data, list) and isinstance(part, int) and part < len(data)
        if not found:
            return False
        data = data[part]
    return True


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _drop_none(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, Mapping) else v for k, v in data.items() if v is not None}

