"""The ``[mqtt]`` settings and the broker configuration written from them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import pki
from gateway._mqtt import (
    BrokerCredentials,
    BrokerFiles,
    MqttSettings,
    device_acl,
    dynsec_config,
    render_mosquitto_conf,
)
from tests.conftest import IssueFn


def test_unknown_key_and_bad_values_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        MqttSettings.model_validate({"prot": 1})
    with pytest.raises(ValidationError):
        MqttSettings(managed=False)  # needs broker_address
    with pytest.raises(ValidationError):
        MqttSettings(broker_address="no-port")
    assert MqttSettings(managed=False, broker_address="mqtt:8883").broker_address == "mqtt:8883"


def test_written_configuration_keeps_the_promises(issue: IssueFn, tmp_path: Path) -> None:
    gw = issue("gateway", "gw-conf")
    settings = MqttSettings(data_dir=tmp_path)
    conf = render_mosquitto_conf(
        settings, identity=gw, files=BrokerFiles(tmp_path), port=8883, bridge_port=8884
    )
    lines = conf.splitlines()
    for expected in (
        "per_listener_settings true",
        "set_tcp_nodelay true",
        "persistence true",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
        "allow_anonymous false",
        f"ciphers {pki.AEAD_CIPHERS_TLS12}",
        "sys_interval 0",
    ):
        assert expected in lines, expected
    assert "CBC" not in conf
    assert lines.count("require_certificate true") == 2  # both listeners
    assert lines.count(f"crlfile {settings.crl_file}") == 2
    # The devices' ACL: exact topics, never a trailing wildcard, no per-user grants.
    acl = [line for line in device_acl().splitlines() if line and not line.startswith("#")]
    assert all(line.startswith("pattern ") and not line.endswith("#") for line in acl)
    assert not any(line.startswith("user ") for line in acl)


def test_dynsec_grants_the_bridge_only_what_it_needs() -> None:
    creds = BrokerCredentials.generate()
    cfg = dynsec_config(creds, shared_group="edgeward")
    assert creds.bridge_password not in str(cfg)  # only a salted hash is written
    assert all(v is False for v in cfg["defaultACLAccess"].values())
    roles = {r["rolename"]: r["acls"] for r in cfg["roles"]}
    send = {a["topic"] for a in roles["edgeward-bridge"] if a["acltype"] == "publishClientSend"}
    recv = {a["topic"] for a in roles["edgeward-bridge"] if a["acltype"] == "publishClientReceive"}
    assert send == {"devices/+/detections", "devices/+/events"}
    assert recv == {"devices/+/frames", "devices/+/telemetry"}
    assert not any("$CONTROL" in a["topic"] for a in roles["edgeward-bridge"])
    assert "password" not in repr(creds)


def test_plugin_validates_its_table(tmp_path: Path) -> None:
    from gateway._config import GatewaySettings
    from gateway._mqtt import plugin
    from gateway._settings import ConfigError

    base = {"identity_dir": tmp_path, "pki_dir": tmp_path}
    assert plugin(GatewaySettings(**base)) is None
    assert plugin(GatewaySettings(**base, mqtt={"enabled": False})) is None
    assert callable(plugin(GatewaySettings(**base, mqtt={"port": 18883})))
    with pytest.raises(ConfigError, match=r"mqtt\.prot"):
        plugin(GatewaySettings(**base, mqtt={"prot": 1}))
