"""Option parsing: flags, env vars, config file; one clear line per invalid value."""

import subprocess
import sys

import pytest

from amqproxy.config import ConfigError, parse_config
from amqproxy.nodes import Node
from amqproxy.options import OPTIONS


def test_defaults():
    config = parse_config([], env={})
    assert config.listen == ("127.0.0.1", 5673)
    assert config.upstream == [Node("127.0.0.1", 5672, False)]
    assert config.http_listen == ("127.0.0.1", 15673)
    assert config.log_format == "json"


def test_flag_env_and_file_precedence(tmp_path):
    conf = tmp_path / "amqproxy.conf"
    conf.write_text("idle-timeout = 7\nclient-heartbeat = 9\nupstream = [amqp://a:1, amqps://b]\n")
    config = parse_config(["--config", str(conf), "--client-heartbeat", "11"], env={"AMQPROXY_IDLE_TIMEOUT": "8"})
    assert config.client_heartbeat == 11  # flag beats env and file
    assert config.idle_timeout == 8  # env beats file
    assert config.upstream == [Node("a", 1, False), Node("b", 5671, True)]


def test_repeated_upstream_flags():
    config = parse_config(["--upstream", "amqp://h1", "--upstream", "amqp://h2:5673"], env={})
    assert [n.label for n in config.upstream] == ["h1:5672", "h2:5673"]


def test_proxy_protocol_per_upstream_url():
    config = parse_config(["--upstream", "amqp://h1?proxy_protocol=v2,amqp://h2,amqps://h3?proxy_protocol=v1"], env={})
    assert [n.proxy_protocol for n in config.upstream] == ["v2", "", "v1"]
    for bad in ("amqp://h1?proxy_protocol=v3", "amqp://h1?heartbeat=5"):
        with pytest.raises(ConfigError, match="--upstream"):
            parse_config(["--upstream", bad], env={})


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--listen", "nope"], "--listen"),
        (["--upstream", "http://x"], "--upstream"),
        (["--frame-max", "100"], "--frame-max"),
        (["--idle-timeout", "-1"], "--idle-timeout"),
        (["--log-format", "xml"], "--log-format"),
        (["--bogus"], "unrecognized"),
    ],
)
def test_invalid_values_name_the_option(argv, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(argv, env={})
    assert needle in str(err.value)


def test_password_in_an_invalid_url_is_not_echoed():
    with pytest.raises(ConfigError) as err:
        parse_config(["--upstream", "amqp://user:s3cret@host:notaport"], env={})
    assert "s3cret" not in str(err.value)


def test_every_option_has_env_and_config_names():
    for option in OPTIONS:
        assert option.env == "AMQPROXY_" + option.name.upper()
        assert option.flag.startswith("--") and option.config_key == option.flag[2:]


def test_cli_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "amqproxy", "--channel-max", "0"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--channel-max" in lines[0]


def test_cli_missing_config_file_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "amqproxy", "--config", str(tmp_path / "missing.conf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--config" in result.stderr or "config" in result.stderr.lower()


def test_liveness_defaults():
    defaults = parse_config([], env={})
    assert (defaults.upstream_heartbeat, defaults.upstream_silence_timeout) == (5, 8.0)
    assert defaults.breaker_probe_interval == 0.25
    assert (defaults.upstream_keepalive, defaults.upstream_tcp_user_timeout) == (10.0, 0.0)


def test_defaults_are_written_once_in_the_options_table():
    from amqproxy.config import Config, option_defaults

    settings = {name for name in Config.__annotations__} - {"tls_server", "tls_upstream", "auth", "sources"}
    assert settings == {option.name for option in OPTIONS}, "every option is a Config setting and vice versa"
    parsed, built = parse_config([], env={}), Config()
    for option in OPTIONS:
        assert getattr(built, option.name) == getattr(parsed, option.name) == option_defaults()[option.name], (
            option.name
        )
    built.allow_cidr.append("10.0.0.0/8")
    assert Config().allow_cidr == [], "each Config has its own lists"
    assert Config(idle_timeout=5).idle_timeout == 5
