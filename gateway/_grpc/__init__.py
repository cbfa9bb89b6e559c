"""The device-facing gRPC side of the gateway (private; see :mod:`gateway`).

It judges peer certificates and keeps the live calls a revocation cuts; everything else about a
call is the front door's (:mod:`gateway._door`).
"""

from gateway._grpc._identity import IdentityJudge, PeerIdentity
from gateway._grpc._live import LiveCall, LiveCalls
from gateway._grpc._server import SERVICE_NAME, GatewayServer
from gateway._grpc._servicer import DeviceGatewayServicer

__all__ = [
    "SERVICE_NAME",
    "DeviceGatewayServicer",
    "GatewayServer",
    "IdentityJudge",
    "LiveCall",
    "LiveCalls",
    "PeerIdentity",
]
