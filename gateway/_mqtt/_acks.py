"""Acknowledgements of received QoS 1 messages, sent once each message has been handled.

A frame is acknowledged to the broker only once its answer (or its refusal) is out, so what a
crashed gateway had received is delivered again; acknowledgements go in the order the messages
arrived (MQTT 5 §4.6).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import aiomqtt

__all__ = ["Ack", "Acks"]


class Ack:
    """One received message's acknowledgement, owed once it has been handled."""

    __slots__ = ("_owner", "done_", "mid", "qos")

    def __init__(self, owner: Acks | None, mid: int, qos: int) -> None:
        self._owner = owner
        self.mid = mid
        self.qos = qos
        self.done_ = False

    def done(self) -> None:
        if not self.done_:
            self.done_ = True
            if self._owner is not None:
                self._owner.release()


class Acks:
    """The QoS 1 acknowledgements one connection owes, sent as messages are handled.

    Sent in the order the messages arrived (MQTT 5 §4.6: PUBACKs go in the order the
    PUBLISHes were received): a handled message waits for those before it. After the
    connection is lost nothing more is sent on its behalf (its unacknowledged messages
    come again on the next connection, which owes them then).
    """

    def __init__(self, paho: Any) -> None:
        self._paho = paho
        self._owed: deque[Ack] = deque()
        self._closed = False

    def track(self, message: aiomqtt.Message) -> Ack:
        if message.qos == 0:
            return Ack(None, message.mid, 0)
        ack = Ack(self, message.mid, message.qos)
        self._owed.append(ack)
        return ack

    def release(self) -> None:
        if self._closed:
            return
        while self._owed and self._owed[0].done_:
            ack = self._owed.popleft()
            self._paho.ack(ack.mid, ack.qos)

    def close(self) -> None:
        self._closed = True
        self._owed.clear()
