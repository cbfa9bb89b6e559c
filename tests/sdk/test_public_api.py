"""The SDK's public surface: everything in ``__all__`` exists, is documented, and the SDK
does not pull in the gateway (a device installs no inference runtime)."""

from __future__ import annotations

import subprocess
import sys

import device_sdk
import device_sdk.errors


def test_exported_members_exist_and_are_documented() -> None:
    assert sorted(device_sdk.__all__) == device_sdk.__all__
    for name in device_sdk.__all__:
        member = getattr(device_sdk, name)
        if callable(member) and not name.endswith("Outcome"):
            assert member.__doc__, f"{name} has no docstring"
    errors = set(device_sdk.errors.__all__)
    assert errors <= set(device_sdk.__all__)
    for name in errors:
        assert issubclass(getattr(device_sdk.errors, name), device_sdk.DeviceSdkError)
    assert device_sdk.DeviceRevoked.final
    assert device_sdk.CertificateExpired.final
    assert not device_sdk.QueueFull.final
    # Enrolment and renewal as functions: what ``edgeward enroll`` calls.
    assert {"enroll", "renew", "EnrollmentResult"} <= set(device_sdk.__all__)


def test_the_sdk_imports_no_gateway_and_no_onnxruntime() -> None:
    code = (
        "import sys, device_sdk, device_sdk._enrollment, edgeward._cli_device; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('gateway', 'onnxruntime', 'numpy')]; "
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
