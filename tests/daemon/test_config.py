"""Daemon config: precedence of its sources, and errors that name the file, line and field."""

import os
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from optd.daemon.config import ConfigError, DaemonConfig, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "optd.yaml"


@pytest.fixture(autouse=True)
def _no_optd_env(monkeypatch):
    # A developer's own OPTD_* variables must not leak into these tests.
    for name in list(os.environ):
        if name.upper().startswith("OPTD_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "optd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(path: Path | None = None, overrides: dict | None = None) -> DaemonConfig:
    # default_path somewhere empty, so a real /etc/optd/optd.yaml on the test machine changes nothing.
    return load_config(path, overrides or {}, default_path=Path("/nonexistent/optd.yaml"))


def test_defaults_without_a_file():
    cfg = load()
    assert (cfg.server.host, cfg.server.port, cfg.server.max_waiting) == ("127.0.0.1", 8000, 256)
    assert cfg.server.control_token is None and cfg.store.url is None and cfg.policy is None
    assert cfg.telemetry.interval_s == 1.0 and cfg.mqtt.url is None and cfg.mqtt.node
    assert cfg.store.database_url(Path("/var/lib/optd")) == "sqlite:////var/lib/optd/optd.db"


def test_precedence_file_then_env_then_overrides(tmp_path, monkeypatch):
    path = write(tmp_path, "server:\n  port: 7000\n  host: 0.0.0.0\n  max_waiting: 10\n"
                           "telemetry: {interval_s: 2}\n")
    assert load(path).server.port == 7000
    monkeypatch.setenv("OPTD_SERVER__PORT", "9000")
    monkeypatch.setenv("OPTD_SERVER__MAX_WAITING", "20")
    monkeypatch.setenv("OPTD_POLICY", "balanced")
    cfg = load(path)
    assert (cfg.server.port, cfg.server.max_waiting, cfg.server.host) == (9000, 20, "0.0.0.0")
    assert cfg.policy == "balanced" and cfg.telemetry.interval_s == 2.0
    # None in overrides means "flag not given": the lower sources stand.
    cfg = load(path, {"server": {"port": 9100, "host": None}, "policy": None, "engine": {"model": "/m"}})
    assert (cfg.server.port, cfg.server.max_waiting, cfg.server.host) == (9100, 20, "0.0.0.0")
    assert cfg.policy == "balanced" and cfg.engine.model == "/m"


def test_default_path_used_only_when_it_exists(tmp_path):
    default = write(tmp_path, "server: {port: 7001}\n")
    assert load_config(None, {}, default_path=default).server.port == 7001
    assert load_config(None, {}, default_path=tmp_path / "absent.yaml").server.port == 8000


def test_unknown_key_names_the_field_and_line(tmp_path):
    path = write(tmp_path, "# comment\nserver:\n  host: 127.0.0.1\n  prot: 9000\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}:4: server.prot: unknown key 'prot' (did you mean 'port'?)"
    path = write(tmp_path, "servers: {}\n")
    with pytest.raises(ConfigError, match=r"optd.yaml:1: servers: unknown key 'servers' \(did you mean"):
        load(path)


def test_bad_type_names_the_file_line_and_field(tmp_path):
    path = write(tmp_path, "engine:\n  model: demo\nserver:\n\n  port: eighty\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:5: server.port: Input should be a valid integer"), msg
    assert "'eighty'" in msg
    # Several errors: one line each.
    path = write(tmp_path, "server: {port: -1}\ntelemetry:\n  interval_s: 0\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    lines = str(e.value).splitlines()
    assert [line.split(": ")[:2] for line in lines] == [[f"{path}:1", "server.port"],
                                                        [f"{path}:3", "telemetry.interval_s"]]


def test_errors_name_the_environment_variable_or_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTD_SERVER__PORT", "x")
    with pytest.raises(ConfigError, match=r"^environment OPTD_SERVER__PORT: server.port: Input should be"):
        load()
    monkeypatch.delenv("OPTD_SERVER__PORT")
    with pytest.raises(ConfigError, match=r"^command line: engine.max_num_seqs: Input should be greater"):
        load(None, {"engine": {"max_num_seqs": 0}})
    with pytest.raises(ConfigError, match=r"^command line: mqtt.node: must be a non-empty MQTT topic level"):
        load(None, {"mqtt": {"node": "rack/1"}})
    monkeypatch.setenv("OPTD_SERVER", "{not json")
    with pytest.raises(ConfigError, match=r'^environment: error parsing value for field "server"'):
        load()


def test_cross_field_checks_name_the_knob(tmp_path):
    path = write(tmp_path, "engine:\n  draft_model: ngram\n  max_spec_length: 4\nknobs:\n  spec_length: 6\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}:5: knobs.spec_length: 6 exceeds engine.max_spec_length (4)"
    with pytest.raises(ConfigError, match=r"knobs.spec_length: needs engine.draft_model"):
        load(None, {"knobs": {"spec_length": 2}})
    with pytest.raises(ConfigError, match=r"knobs.max_batch_size: 65 exceeds engine.max_num_seqs \(64\)"):
        load(None, {"knobs": {"max_batch_size": 65}})


def test_control_token_is_secret_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTD_SERVER__CONTROL_TOKEN", "s3cret-s3cret-s3cret")
    cfg = load()
    assert cfg.server.control_token.get_secret_value() == "s3cret-s3cret-s3cret"
    assert "s3cret" not in repr(cfg)
    monkeypatch.setenv("OPTD_SERVER__CONTROL_TOKEN", "short-secret")
    with pytest.raises(ConfigError) as e:
        load()
    msg = str(e.value)
    assert "server.control_token: must be at least 16 characters" in msg and "short-secret" not in msg


def test_file_problems(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope.yaml: no such config file"):
        load(missing)
    with pytest.raises(ConfigError, match=r"optd.yaml:3: invalid YAML: mapping values are not allowed"):
        load(write(tmp_path, "server:\n  port: 1\n   host: x\n"))
    with pytest.raises(ConfigError, match=r"optd.yaml:1: the top level must be a mapping"):
        load(write(tmp_path, "- server\n"))
    with pytest.raises(ConfigError, match=r"optd.yaml:3: server.port: duplicate key \(first at line 2\)"):
        load(write(tmp_path, "server:\n  port: 1\n  port: 2\n"))
    assert load(write(tmp_path, "# all defaults\n")).server.port == 8000


def leaf_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= leaf_paths(ann, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def test_the_example_config_loads_and_shows_every_field():
    cfg = load(EXAMPLE)
    assert cfg.model_dump(exclude={"mqtt": {"node"}}) == load().model_dump(exclude={"mqtt": {"node"}})

    def paths(data: dict, prefix: str = "") -> set[str]:
        return set().union(*(paths(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
                             for k, v in data.items()))

    # mqtt.node defaults to the host name, so the example can only show it commented out.
    shown = paths(yaml.safe_load(EXAMPLE.read_text())) | {"mqtt.node"}
    assert shown == leaf_paths(DaemonConfig)
    text = EXAMPLE.read_text()
    assert "# node:" in text
    for line in text.splitlines():
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"field without a comment in {EXAMPLE.name}: {line!r}"


def test_engine_config_mapping(tmp_path):
    from optd.engine import EngineConfig

    path = write(tmp_path, "engine:\n  model: /models/x\n  draft_model: demo-draft\n  device: cuda:1\n"
                           "  dtype: bfloat16\n  max_model_len: 2048\n  max_num_seqs: 32\n"
                           "  max_spec_length: 4\n  kv_cache_memory: 2GiB\n  gpu_memory_utilization: 0.5\n"
                           "  cuda_graphs: false\n")
    ec = load(path).engine_config()
    assert isinstance(ec, EngineConfig)
    assert (ec.model, ec.draft_model, ec.device) == ("/models/x", "demo-draft", "cuda:1")
    assert ec.dtype == "bfloat16"
    assert (ec.max_model_len, ec.max_num_seqs, ec.max_spec_length) == (2048, 32, 4)
    assert ec.kv_cache_memory == 2 * 2**30 and type(ec.kv_cache_memory) is int
    assert (ec.gpu_memory_utilization, ec.cuda_graphs) == (0.5, False)
    default = load().engine_config()
    assert (default.model, default.kv_cache_memory, default.max_num_seqs) == ("demo", None, 64)
