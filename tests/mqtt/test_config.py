"""The ``[mqtt]`` settings and the broker configuration written from them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import pki
from gateway import MqttSettings
from gateway._mqtt import (
    INTERNAL_PREFIX,
    BrokerCredentials,
    BrokerFiles,
    MqttBridge,
    device_acl,
    dynsec_config,
    internal_name,
    render_mosquitto_conf,
)
from gateway._mqtt._mosquitto_conf import CONTROL_CLIENT_ID
from tests._support.mqtt import front_door
from tests.conftest import IssueFn


def test_unknown_key_and_bad_values_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        MqttSettings.model_validate({"prot": 1})
    with pytest.raises(ValidationError):
        MqttSettings(managed=False)  # needs broker_address
    with pytest.raises(ValidationError):
        MqttSettings(broker_address="no-port")
    # Devices' client ids are always their CN now; the old switch is gone, not ignored.
    with pytest.raises(ValidationError, match="extra"):
        MqttSettings.model_validate({"one_connection_per_device": False})
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
    # Debian's Mosquitto 2.0.11 (CVE-2023-28366 fix) disconnects a client whose refused
    # publication finds its outgoing queue at max_queued_messages: 0 would turn every
    # refusal by the ingest limit into a disconnect.
    (queued,) = [line for line in lines if line.startswith("max_queued_messages ")]
    assert int(queued.split()[1]) >= 1000
    # Client ids are one namespace across listeners: the devices' listener (the first) forces
    # them to the CN; the gateway's listener keeps its clients' own ids.
    devices, bridge = conf.split("\nlistener ")[1:]
    assert "use_username_as_clientid true" in devices.splitlines()
    assert "use_username_as_clientid" not in bridge
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
    bridge = roles[creds.bridge_username]
    send = {a["topic"] for a in bridge if a["acltype"] == "publishClientSend"}
    recv = {a["topic"] for a in bridge if a["acltype"] == "publishClientReceive"}
    assert send == {"devices/+/detections", "devices/+/events"}
    assert recv == {"devices/+/frames", "devices/+/telemetry"}
    assert not any("$CONTROL" in a["topic"] for a in bridge)
    assert "password" not in repr(creds)


def test_plugin_validates_its_table(tmp_path: Path) -> None:
    from gateway import ConfigError, GatewaySettings
    from gateway._mqtt import plugin

    base = {"identity_dir": tmp_path, "pki_dir": tmp_path}
    assert plugin(GatewaySettings(**base)) is None
    assert plugin(GatewaySettings(**base, mqtt={"enabled": False})) is None
    assert callable(plugin(GatewaySettings(**base, mqtt={"port": 18883})))
    with pytest.raises(ConfigError, match=r"mqtt\.prot"):
        plugin(GatewaySettings(**base, mqtt={"prot": 1}))


def test_internal_names_are_never_device_ids(issue: IssueFn, tmp_path: Path) -> None:
    """Every username and client id of the gateway's own lies outside the device id alphabet.

    A device's client id is its CN; a CN the CA signs is a device id. So no device can take
    over one of these connections, and no revocation (a kick by username) can delete one.
    """
    creds = BrokerCredentials.generate()
    bridge = MqttBridge(
        MqttSettings(data_dir=tmp_path, telemetry_workers=2),
        connection=None,  # type: ignore[arg-type]  # only names are asked for
        door=front_door(None, gateway_id="gw-1"),
    )
    names = [creds.bridge_username, creds.control_username, CONTROL_CLIENT_ID]
    names += [bridge._client_id(kind, i) for kind in ("frames", "telemetry") for i in range(32)]
    for name in names:
        assert name.startswith(INTERNAL_PREFIX), name
        with pytest.raises(pki.InvalidName):
            pki.validate_id(name)
    assert internal_name("gw-1", "frames-0") == "_edgeward.gw-1.frames-0"
    # Nor could our CA be asked for a device with such a name.
    with pytest.raises(pki.InvalidName):
        issue("device", creds.bridge_username)
