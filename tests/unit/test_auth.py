"""Proxy authentication (--auth-file) and secrets: hashes, the credential file, secret files, and
the rules that keep secrets off the command line and out of files everyone can read."""

import os
import subprocess
import sys

import pytest

from amqproxy import auth
from amqproxy.config import ConfigError, parse_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def private(path, text):
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("scheme", ["scrypt", "pbkdf2-sha256"])
def test_hash_and_verify(scheme):
    encoded = auth.hash_password("s3cret é", scheme)
    assert encoded.startswith(scheme + "$")
    assert "s3cret" not in encoded
    auth.check_hash_format(encoded)
    assert auth.verify_password("s3cret é", encoded)
    assert not auth.verify_password("s3cret", encoded)
    assert auth.hash_password("s3cret é", scheme) != encoded  # salted


@pytest.mark.parametrize(
    "value", ["s3cret", "scrypt$16384$8$1$salt", "scrypt$1000$8$1$AAAA$AAAA", "md5$abc$def", "pbkdf2-sha256$x$AA$AA"]
)
def test_plain_or_malformed_hashes_are_refused(value):
    with pytest.raises(ValueError, match="plain passwords are not accepted"):
        auth.check_hash_format(value)


@pytest.fixture
def users_file(tmp_path):
    pw = private(tmp_path / "orders.pw", "broker-pw-1\n")
    return private(
        tmp_path / "users.toml",
        f"""
[users.app1]
password = "{auth.hash_password("app1-pw")}"
upstream_user = "orders"
upstream_password_file = "{pw}"

[users."cert only"]
upstream_user = "billing"
upstream_password_env = "BILLING_PW"

[certificates]
"CN=worker,O=Example" = "cert only"
"worker-2" = "cert only"
""",
    )


def test_load_and_verify(users_file):
    users = auth.load_file(str(users_file), {"BILLING_PW": "broker-pw-2"})
    app1 = users.verify("app1", "app1-pw")
    assert app1 is not None and (app1.upstream_user, app1.upstream_password) == ("orders", "broker-pw-1")
    assert "broker-pw" not in repr(app1)
    assert users.verify("app1", "app1-pw") is app1  # remembered: no second scrypt
    assert users.verify("app1", "wrong") is None
    assert users.verify("nobody", "app1-pw") is None
    assert users.verify("cert only", "") is None  # no password: certificate only
    by_dn = users.user_for_subject("CN=worker,O=Example", "worker")
    assert by_dn is not None and by_dn.upstream_password == "broker-pw-2"
    assert users.user_for_subject("CN=worker-2", "worker-2") is by_dn  # bare CN
    assert users.user_for_subject("CN=stranger", "stranger") is None


@pytest.mark.parametrize(
    "body,needle",
    [
        ('[users.a]\npassword = "plain"\nupstream_user = "u"\nupstream_password_env = "X"\n', "not a password hash"),
        ('[users.a]\nupstream_user = "u"\nupstream_password = "inline"\n', "not allowed"),
        ('[users.a]\nupstream_user = "u"\n', "exactly one of"),
        ('[users.a]\nupstream_user = "u"\nupstream_password_env = "NOT_SET_ANYWHERE"\n', "is not set"),
        ('[users.a]\nupstream_user = "u"\nupstream_password_env = "X"\n[certificates]\n"CN=x" = "b"\n', "unknown user"),
        ("[users.a\n", "not valid TOML"),
        ("[groups]\n", "unknown section"),
    ],
)
def test_bad_files_are_refused(tmp_path, body, needle):
    path = private(tmp_path / "users.toml", body)
    with pytest.raises(auth.AuthFileError, match=needle) as err:
        auth.load_file(str(path), {"X": "x"})
    assert str(err.value).startswith("--auth-file: ")


def test_world_readable_files_are_refused(tmp_path, users_file):
    users_file.chmod(0o644)
    with pytest.raises(auth.AuthFileError, match="readable by everyone"):
        auth.load_file(str(users_file), {"BILLING_PW": "x"})
    users_file.chmod(0o600)
    (tmp_path / "orders.pw").chmod(0o604)
    with pytest.raises(auth.AuthFileError, match="upstream_password_file.*readable by everyone"):
        auth.load_file(str(users_file), {"BILLING_PW": "x"})


def test_auth_file_option(users_file):
    config = parse_config(["--auth-file", str(users_file)], env={"BILLING_PW": "b"})
    assert config.auth is not None and set(config.auth.users) == {"app1", "cert only"}
    with pytest.raises(ConfigError, match="--auth-file: .*BILLING_PW is not set"):
        parse_config(["--auth-file", str(users_file)], env={})


def test_admin_token_is_refused_on_the_command_line():
    for argv in (["--admin-token", "Zq9-secret"], ["--admin-token=Zq9-secret"]):
        with pytest.raises(ConfigError) as err:
            parse_config(argv, env={})
        assert str(err.value).startswith("--admin-token: a secret is not accepted on the command line")
        assert "Zq9" not in str(err.value)
    assert parse_config([], env={"AMQPROXY_ADMIN_TOKEN": "tok"}).admin_token == "tok"


def test_admin_token_file(tmp_path):
    token = private(tmp_path / "token", "tok-123\n")
    assert parse_config(["--admin-token-file", str(token)], env={}).admin_token == "tok-123"
    token.chmod(0o644)
    with pytest.raises(ConfigError, match="--admin-token-file: .* readable by everyone"):
        parse_config(["--admin-token-file", str(token)], env={})
    token.chmod(0o600)
    with pytest.raises(ConfigError, match="not both"):
        parse_config(["--admin-token-file", str(token)], env={"AMQPROXY_ADMIN_TOKEN": "x"})


def test_config_file_with_a_secret_must_not_be_world_readable(tmp_path):
    conf = tmp_path / "amqproxy.conf"
    conf.write_text("idle-timeout = 5\nadmin-token = tok\n")
    conf.chmod(0o644)
    with pytest.raises(ConfigError, match="--config: .* holds a secret \\(admin-token\\) and is readable by everyone"):
        parse_config(["--config", str(conf)], env={})
    conf.chmod(0o640)
    assert parse_config(["--config", str(conf)], env={}).admin_token == "tok"
    plain = tmp_path / "plain.conf"
    plain.write_text("idle-timeout = 5\n")
    plain.chmod(0o644)
    assert parse_config(["--config", str(plain)], env={}).idle_timeout == 5  # no secret: fine


def test_hash_password_cli():
    run = subprocess.run(
        [sys.executable, "-m", "amqproxy", "hash-password", "--user", "app1", "--upstream-password-env", "APP1_PW"],
        input="pw-1\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith('[users.app1]\npassword = "scrypt$')
    assert 'upstream_user = "app1"' in run.stdout and 'upstream_password_env = "APP1_PW"' in run.stdout
    encoded = run.stdout.split('"')[1]
    assert auth.verify_password("pw-1", encoded) and "pw-1" not in run.stdout
