"""The gateway end to end: real mTLS grpc.aio on port 0, the real engine and model, real photos."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import Command, ErrorEvent, EscalationAnswer
from protos.edgeward.v1 import common_pb2, gateway_pb2
from tests._support.gateway import start_gateway
from tests.gateway._helpers import png_header_only, rpc_error, tiny_jpeg, wait_until

pytestmark = pytest.mark.timeout(60)


def frame(photos: Path, name: str, frame_id: str = "f") -> common_pb2.Frame:
    return common_pb2.Frame(image=(photos / name).read_bytes(), frame_id=frame_id)


async def test_detect_chelsea_over_mtls_is_a_cat(issue, tmp_path, photos):
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        gw.register("cam-chelsea", "pet_camera")
        async with gw.channel(issue("device", "cam-chelsea")) as channel:
            result = await gw.stub(channel).Detect(frame(photos, "chelsea.jpg", "f-1"), timeout=10)
        assert result.frame_id == "f-1"
        assert result.gateway_id == "gw-test"
        assert result.model_name == "edge_ssd_mobilenetv2_oid24"
        assert not result.from_cache
        top = max(result.detections, key=lambda d: d.score)
        assert top.label == "Cat"
        assert top.score > 0.7
        assert 0.0 <= top.box.x_min < top.box.x_max <= 1.0
        assert result.inference_ms > 0


async def test_stream_detect_answers_each_frame_in_order(issue, tmp_path, photos):
    names = ["chelsea.jpg", "dog.jpg", "person.jpg", "chelsea.jpg"]
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        gw.register("cam-stream", "pet_camera")

        async def frames():
            for i, name in enumerate(names):
                yield frame(photos, name, f"s-{i}")

        async with gw.channel(issue("device", "cam-stream")) as channel:
            results = [r async for r in gw.stub(channel).StreamDetect(frames(), timeout=20)]
        assert [r.frame_id for r in results] == [f"s-{i}" for i in range(len(names))]
        assert "Cat" in {d.label for d in results[0].detections}
        assert "Dog" in {d.label for d in results[1].detections}
        assert "Person" in {d.label for d in results[2].detections}
        text = gw.metrics_text()
        assert 'edgeward_gateway_frames_total{code="OK",method="StreamDetect"} 4.0' in text


async def test_cache_hit_is_marked(issue, tmp_path, photos):
    overrides = {"cache": {"enabled": True}}
    async with start_gateway(
        issue=issue, tmp_path=tmp_path, use_registry=False, overrides=overrides
    ) as gw:
        async with gw.channel(issue("device", "cam-cache")) as channel:
            stub = gw.stub(channel)
            first = await stub.Detect(frame(photos, "dog.jpg"), timeout=10)
            second = await stub.Detect(frame(photos, "dog.jpg"), timeout=10)
        assert not first.from_cache
        assert second.from_cache
        assert [d.label for d in second.detections] == [d.label for d in first.detections]
        assert 'edgeward_gateway_cache_lookups_total{kind="exact"} 1.0' in gw.metrics_text()


async def test_report_telemetry_keeps_latest_state_and_validates(issue, tmp_path):
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        async with gw.channel(issue("device", "vac-telemetry")) as channel:
            stub = gw.stub(channel)
            ack = await stub.ReportTelemetry(
                common_pb2.Telemetry(
                    battery_percent=81,
                    temperature_c=31.5,
                    firmware_version="1.2.3",
                    readings={"wifi_rssi": -61.0, "dust_bin_full": 0.0},
                ),
                timeout=5,
            )
            assert ack.id
            bad = [
                common_pb2.Telemetry(battery_percent=150),
                common_pb2.Telemetry(readings={f"k{i}": 1.0 for i in range(33)}),
                common_pb2.Telemetry(readings={"wifi_rssi": float("nan")}),
                common_pb2.Telemetry(readings={"devices/+/x": 1.0}),
                common_pb2.Telemetry(firmware_version="x" * 200),
            ]
            for telemetry in bad:
                err = await rpc_error(stub.ReportTelemetry(telemetry, timeout=5))
                assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, telemetry
        assert gw.service.door is not None
        latest = gw.service.door.telemetry.latest("vac-telemetry")
        assert latest is not None
        assert latest.battery_percent == 81
        assert latest.readings == {"wifi_rssi": -61.0, "dust_bin_full": 0.0}


async def test_subscribe_sees_only_its_own_events(issue, tmp_path):
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        hub = gw.service.events
        # Stored before A subscribes: replayed. B's events must never reach A.
        hub.publish("dev-aaa", Command("reboot"))
        hub.publish("dev-bbb", Command("secret-for-b"))
        async with gw.channel(issue("device", "dev-aaa")) as channel:
            call = gw.stub(channel).Subscribe(gateway_pb2.SubscribeRequest(), timeout=10)
            first = await call.read()
            assert first.command.name == "reboot"
            hub.publish("dev-bbb", ErrorEvent("INVALID_ARGUMENT", "b only"))
            hub.publish(
                "dev-aaa",
                EscalationAnswer("esc-1", "f-9", "Cat", 0.9, "nanodet-coco80", edge_label="Dog"),
            )
            second = await call.read()
            assert second.escalation.escalation_id == "esc-1"
            assert second.escalation.edge_label == "Dog"
            # Resume after the first id: only what came later is replayed.
            resumed = gw.stub(channel).Subscribe(
                gateway_pb2.SubscribeRequest(after_event_id=first.event_id), timeout=10
            )
            again = await resumed.read()
            assert again.event_id == second.event_id
            call.cancel()
            resumed.cancel()
        seen = [first, second, again]
        assert all(e.WhichOneof("kind") != "error" for e in seen)
        assert all("secret-for-b" not in str(e) for e in seen)


async def test_health_service_reports_serving(issue, tmp_path):
    async with (
        start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw,
        gw.channel(issue("device", "cam-health")) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        # The whole server, and the service by its wire name (what a health probe names).
        for name in ("", "edgeward.v1.DeviceGateway"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_metrics_endpoint_shows_requests_batches_and_denials(issue, tmp_path, photos):
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        async with gw.channel(issue("device", "cam-metrics")) as channel:
            stub = gw.stub(channel)
            await stub.Detect(frame(photos, "coffee.jpg"), timeout=10)
            await rpc_error(
                stub.StreamDetect(iter([frame(photos, "coffee.jpg")]), timeout=10).read()
            )
        text = gw.metrics_text()
    assert 'edgeward_gateway_requests_total{code="OK",method="Detect"} 1.0' in text
    assert 'edgeward_gateway_denials_total{reason="method_not_allowed"} 1.0' in text
    assert "edgeward_gateway_batch_size_count 1.0" in text
    assert "edgeward_gateway_request_seconds_bucket" in text
    assert "edgeward_gateway_revocation_feed_healthy" in text


async def test_unregistered_type_may_detect_but_not_stream(issue, tmp_path, photos):
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        gw.register("door-bell", "doorbell")
        async with gw.channel(issue("device", "door-bell")) as channel:
            stub = gw.stub(channel)
            assert (await stub.Detect(frame(photos, "dog.jpg"), timeout=10)).detections
            err = await rpc_error(
                stub.StreamDetect(iter([frame(photos, "dog.jpg")]), timeout=10).read()
            )
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "StreamDetect" in (err.details() or "")


async def test_graceful_stop_finishes_in_flight_frames(issue, tmp_path, photos):
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        async with gw.channel(issue("device", "cam-drain")) as channel:
            stub = gw.stub(channel)
            await stub.Detect(frame(photos, "dog.jpg"), timeout=10)  # connection up
            calls = [
                asyncio.ensure_future(stub.Detect(frame(photos, "person.jpg"), timeout=10))
                for _ in range(4)
            ]
            servicer = gw.service.servicer
            assert servicer is not None
            # Stop once every frame is on the server (in flight or answered).
            await wait_until(
                lambda: servicer.live.count() + sum(c.done() for c in calls) == len(calls)
            )
            assert gw.service.server is not None
            await gw.service.server.stop(5.0)
            results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(not isinstance(r, BaseException) for r in results), results
        assert all(r.detections for r in results)  # type: ignore[union-attr]


async def test_hostile_images_get_clear_statuses_and_others_are_still_served(
    issue, tmp_path, photos
):
    jpeg = (photos / "chelsea.jpg").read_bytes()
    overrides = {"limits": {"max_message_bytes": 512 * 1024}}
    async with start_gateway(
        issue=issue, tmp_path=tmp_path, use_registry=False, overrides=overrides
    ) as gw:
        async with gw.channel(issue("device", "cam-hostile")) as channel:
            stub = gw.stub(channel)
            cases = {
                "non-image": b"GET / HTTP/1.1\r\n\r\n",
                "empty": b"",
                "truncated": jpeg[: len(jpeg) // 2],
                "bomb": png_header_only(20000, 20000),
                "zero-size": png_header_only(0, 0),
            }
            for name, data in cases.items():
                err = await rpc_error(stub.Detect(common_pb2.Frame(image=data), timeout=10))
                assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, name
                assert "invalid image" in (err.details() or ""), name
            one_pixel = await stub.Detect(common_pb2.Frame(image=tiny_jpeg()), timeout=10)
            assert list(one_pixel.detections) == []
            err = await rpc_error(
                stub.Detect(common_pb2.Frame(image=b"\xff\xd8\xff" + bytes(600_000)), timeout=10)
            )
            assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            # The same connection and the gateway still serve.
            ok = await stub.Detect(common_pb2.Frame(image=jpeg), timeout=10)
            assert "Cat" in {d.label for d in ok.detections}
        text = gw.metrics_text()
    assert 'edgeward_gateway_requests_total{code="INVALID_ARGUMENT",method="Detect"} 5.0' in text


async def test_stream_that_never_sends_is_ended_after_idle_timeout(issue, tmp_path):
    overrides = {"limits": {"stream_idle_timeout_s": 0.3}}
    async with start_gateway(
        issue=issue, tmp_path=tmp_path, use_registry=False, overrides=overrides
    ) as gw:
        gw.register("cam-silent", "pet_camera")
        never = asyncio.Event()

        async def silent():
            await never.wait()
            yield common_pb2.Frame()

        async with gw.channel(issue("device", "cam-silent")) as channel:
            call = gw.stub(channel).StreamDetect(silent(), timeout=10)
            loop = asyncio.get_running_loop()
            started = loop.time()
            err = await rpc_error(call.read())
            elapsed = loop.time() - started
        assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.25 < elapsed < 5.0
        assert gw.service.servicer is not None
        assert gw.service.servicer.live.count() == 0


async def test_flood_from_one_device_is_rate_limited_while_another_is_served(
    issue, tmp_path, photos
):
    overrides = {"limits": {"frames_per_s": 1.0, "burst": 2}}
    async with start_gateway(
        issue=issue, tmp_path=tmp_path, use_registry=False, overrides=overrides
    ) as gw:
        image = frame(photos, "dog.jpg")
        async with (
            gw.channel(issue("device", "cam-flood")) as flood_ch,
            gw.channel(issue("device", "cam-calm")) as calm_ch,
        ):
            flood = gw.stub(flood_ch)
            results = await asyncio.gather(
                *(flood.Detect(image, timeout=10) for _ in range(8)), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(errors) >= 5
            assert {e.code() for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert all(
                dict(e.trailing_metadata() or ()).get("edgeward-retry-after-s") for e in errors
            )
            calm = await gw.stub(calm_ch).Detect(image, timeout=10)
            assert calm.detections
        assert "rate_limited" in gw.metrics_text()


async def test_full_queue_answers_resource_exhausted_and_recovers(issue, tmp_path, photos):
    overrides = {"inference": {"queue_size": 1, "max_batch": 1, "max_wait_ms": 0.0}}
    async with start_gateway(
        issue=issue, tmp_path=tmp_path, use_registry=False, overrides=overrides
    ) as gw:
        image = frame(photos, "person.jpg")
        async with gw.channel(issue("device", "cam-busy")) as channel:
            stub = gw.stub(channel)
            results = await asyncio.gather(
                *(stub.Detect(image, timeout=20) for _ in range(24)), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert errors, "a queue of one must overflow under 24 concurrent frames"
            assert {e.code() for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert all("overloaded" in (e.details() or "") for e in errors)
            assert len(errors) < len(results)
            assert (await stub.Detect(image, timeout=10)).detections
        assert gw.service.models.queue_depth() == 0


async def test_too_many_streams_per_device(issue, tmp_path):
    overrides = {"limits": {"max_streams_per_device": 1}}
    async with (
        start_gateway(
            issue=issue, tmp_path=tmp_path, use_registry=False, overrides=overrides
        ) as gw,
        gw.channel(issue("device", "cam-greedy")) as channel,
    ):
        stub = gw.stub(channel)
        first = stub.Subscribe(gateway_pb2.SubscribeRequest(), timeout=10)
        gw.service.events.publish("cam-greedy", Command("ping"))
        assert (await first.read()).command.name == "ping"
        err = await rpc_error(stub.Subscribe(gateway_pb2.SubscribeRequest(), timeout=10).read())
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        first.cancel()


async def test_a_started_gateway_keeps_its_start_up_objects_out_of_collections(issue, tmp_path):
    # A full collection traversing start-up's ~100,000 objects stalls the event loop for tens
    # of milliseconds; once started, the gateway's own objects are frozen out of it.
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    async with start_gateway(issue=issue, tmp_path=tmp_path, use_registry=False) as gw:
        assert gc.get_freeze_count() > 10_000
        tracked = gc.get_objects()  # what a full collection traverses
        assert not any(o is gw.service or o is gw.service.door for o in tracked)
        del tracked
