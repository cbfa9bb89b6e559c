"""Errors raised by :mod:`device_sdk`.

::

    DeviceSdkError
    ├── NotEnrolled            no usable identity in the directory: enrol first
    ├── AlreadyEnrolled        enrol into a directory that already holds an identity
    ├── EnrollmentRefused      the core refused the enrolment or renewal (reason says why)
    ├── EnrollmentUnavailable  the core could not be reached or did not answer in time
    ├── DeviceRevoked          the device is revoked (final: stop retrying)
    ├── CertificateExpired     the certificate expired; renewal is impossible, enrol again
    ├── InvalidDirectory       the signed gateway directory does not verify or parse
    ├── IdentityNotWritable    the identity directory cannot be written (checked before enrolling)
    ├── QueueFull              the offline queue has no room left for this frame
    ├── NoGateway              no gateway answered in time (the frame stays queued)
    ├── RequestRefused         a gateway refused a request (code and the server's reason)
    └── ClientClosed           the client is closed or stopped for good; it accepts nothing

Final errors (``DeviceRevoked``, ``CertificateExpired``) have ``final = True``: a client that
meets one stops all retrying and every later call raises it again.

Errors carry data (device id, reason, code), never a secret: no token, no key.
"""

from __future__ import annotations

__all__ = [
    "AlreadyEnrolled",
    "CertificateExpired",
    "ClientClosed",
    "DeviceRevoked",
    "DeviceSdkError",
    "EnrollmentRefused",
    "EnrollmentUnavailable",
    "IdentityNotWritable",
    "InvalidDirectory",
    "NoGateway",
    "NotEnrolled",
    "QueueFull",
    "RequestRefused",
]


class DeviceSdkError(Exception):
    """Root of every error raised by :mod:`device_sdk`."""

    #: True for errors that retrying can never fix (revoked, expired).
    final: bool = False


class NotEnrolled(DeviceSdkError):
    """The identity directory holds no usable identity."""

    def __init__(self, directory: str, reason: str) -> None:
        super().__init__(
            f"{directory} holds no usable device identity: {reason}; enrol first with "
            "a token from the operator: edgeward enroll --endpoint CORE_HOST:PORT "
            f"--ca-bundle ca-bundle.pem --token TOKEN --out {directory}"
        )
        self.directory = directory
        self.reason = reason


class AlreadyEnrolled(DeviceSdkError):
    """The directory already holds an identity (re-enrol only on purpose, with ``force``)."""

    def __init__(self, directory: str, device_id: str) -> None:
        super().__init__(f"{directory} already holds the identity of device {device_id}")
        self.directory = directory
        self.device_id = device_id


class EnrollmentRefused(DeviceSdkError):
    """The core refused; ``reason`` is its message, ``code`` the gRPC status name."""

    def __init__(self, reason: str, *, code: str = "") -> None:
        super().__init__(f"enrolment refused ({code}): {reason}" if code else reason)
        self.reason = reason
        self.code = code


class EnrollmentUnavailable(DeviceSdkError):
    """The core could not be reached, its certificate was not trusted, or it timed out."""


class DeviceRevoked(DeviceSdkError):
    """The device is revoked. Final: retrying cannot succeed."""

    final = True

    def __init__(self, device_id: str, details: str = "") -> None:
        super().__init__(
            f"device {device_id} is revoked"
            + (f": {details}" if details else "")
            + "; stop and contact the operator"
        )
        self.device_id = device_id
        self.details = details


class CertificateExpired(DeviceSdkError):
    """The device certificate has expired: it cannot renew; enrol again with a new token."""

    final = True

    def __init__(self, device_id: str, not_after: str) -> None:
        super().__init__(
            f"the certificate of device {device_id} expired at {not_after}; "
            "enrol again with a new token"
        )
        self.device_id = device_id
        self.not_after = not_after


class InvalidDirectory(DeviceSdkError):
    """The signed gateway directory cannot be parsed or does not verify."""


class IdentityNotWritable(DeviceSdkError):
    """The identity directory cannot be created or written; nothing was sent to the core."""


class QueueFull(DeviceSdkError):
    """The offline queue is full of frames; the new frame was refused."""

    def __init__(self, frames: int, size_bytes: int) -> None:
        super().__init__(f"offline queue is full ({frames} frames, {size_bytes} bytes)")
        self.frames = frames
        self.size_bytes = size_bytes


class NoGateway(DeviceSdkError):
    """No gateway answered in time. Frames already accepted stay queued and are delivered
    when one is back."""


class RequestRefused(DeviceSdkError):
    """A gateway refused a request for a reason retrying cannot fix; ``code`` is the gRPC
    status name (or the MQTT error code) and ``reason`` the server's own words."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"refused ({code}): {reason}")
        self.code = code
        self.reason = reason


class ClientClosed(DeviceSdkError):
    """The client is closed (or stopped for good); it accepts nothing more."""
