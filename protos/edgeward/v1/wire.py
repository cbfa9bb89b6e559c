"""Wire constants of the ``edgeward.v1`` contract that are not in the ``.proto`` files.

Defined once, here, beside the protos: the gateway and the core send them, the device SDK reads
them. Hand-written (not generated); imports nothing.

* :data:`FINAL_METADATA_KEY` — trailing metadata telling a caller that a refusal is final
  (``revoked``: the device must re-enrol; ``expired``: enrol again); it must stop retrying.
* :data:`RETRY_AFTER_METADATA_KEY` — trailing metadata on ``RESOURCE_EXHAUSTED`` or
  ``UNAVAILABLE``: the earliest time, in seconds (a decimal number), worth retrying after.
* Content types of MQTT payloads: protobuf, or protobuf's JSON mapping.
"""

__all__ = [
    "FINAL_EXPIRED",
    "FINAL_METADATA_KEY",
    "FINAL_REVOKED",
    "JSON_CONTENT_TYPE",
    "PROTOBUF_CONTENT_TYPE",
    "RETRY_AFTER_METADATA_KEY",
]

FINAL_METADATA_KEY = "edgeward-final"
FINAL_REVOKED = "revoked"
FINAL_EXPIRED = "expired"
RETRY_AFTER_METADATA_KEY = "edgeward-retry-after-s"
JSON_CONTENT_TYPE = "application/json"
PROTOBUF_CONTENT_TYPE = "application/x-protobuf"
