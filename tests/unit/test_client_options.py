"""The client's channel defaults and its reading of error details, without a server."""

from __future__ import annotations

import json

import grpc
from grpc_status import rpc_status

from vlm_client import CONNECTION_OPTIONS, HEALTH_CHECK_CONFIG, SERVICE_CONFIG, Overloaded, VLMError, channel_options
from vlm_client.errors import from_rpc_error
from vlm_service.api.status import to_status
from vlm_service.errors import QueueFull


def test_defaults_carry_the_service_config_and_options_override_them_key_by_key():
    defaults = dict(channel_options())
    assert json.loads(defaults["grpc.service_config"]) == SERVICE_CONFIG
    assert defaults["grpc.enable_retries"] == 1
    assert CONNECTION_OPTIONS.items() <= defaults.items()
    overridden = dict(channel_options([("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 1)]))
    assert overridden["grpc.enable_retries"] == 0 and overridden["grpc.max_receive_message_length"] == 1
    assert overridden["grpc.service_config"] == defaults["grpc.service_config"]
    assert "healthCheckConfig" not in json.loads(defaults["grpc.service_config"])
    checked = json.loads(dict(channel_options(health_check=True))["grpc.service_config"])
    assert checked == {**SERVICE_CONFIG, "healthCheckConfig": HEALTH_CHECK_CONFIG}
    (method,) = SERVICE_CONFIG["methodConfig"]
    policy = method["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"] and policy["maxAttempts"] == 5


class FakeCall(grpc.RpcError):
    def __init__(self, code, details, trailers):
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


def test_the_servers_own_status_reads_back_into_the_error():
    status = to_status(QueueFull("the queue is full", retry_after=2.5))
    error = from_rpc_error(FakeCall(status.code, status.details, status.trailing_metadata), "req-1")
    assert isinstance(error, Overloaded) and error.retry_after == 2.5 and error.request_id == "req-1"


def test_details_that_disagree_with_the_status_or_no_trailers_are_ignored():
    status = to_status(QueueFull("the queue is full"))
    # grpc_status refuses a details trailer whose code differs from the call's: no hint is made up.
    error = from_rpc_error(FakeCall(grpc.StatusCode.UNAVAILABLE, status.details, status.trailing_metadata))
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.retry_after is None
    error = from_rpc_error(FakeCall(grpc.StatusCode.INTERNAL, "boom", None))
    assert type(error) is VLMError and error.retry_after is None and error.field_violations == ()
    assert rpc_status.from_call(FakeCall(grpc.StatusCode.INTERNAL, "boom", ())) is None


def test_image_detail_reaches_every_request_kind_and_a_bad_one_is_refused_before_sending():
    import pytest

    from vlm.v1 import vlm_service_pb2 as pb
    from vlm_client import _messages as m

    png = b"\x89PNG"
    assert m.caption_request(png, "", None, "", "low").detail == pb.IMAGE_DETAIL_LOW
    assert m.query_request(png, "q", "", "", "high").detail == pb.IMAGE_DETAIL_HIGH
    assert m.caption_request(png, "", None, "").detail == pb.IMAGE_DETAIL_UNSPECIFIED
    assert m.watch_config("", "", None, "", None, "auto").config.detail == pb.IMAGE_DETAIL_AUTO
    with pytest.raises(ValueError, match="detail must be one of auto, low, high"):
        m.caption_request(png, "", None, "", "medium")
    info = pb.ModelInfo(
        name="m",
        image_details=[
            pb.ImageTiling(detail=pb.IMAGE_DETAIL_AUTO, description="d", max_views=17, max_image_tokens=1088),
            pb.ImageTiling(detail=pb.IMAGE_DETAIL_LOW, description="one 512-px view", max_views=1, max_image_tokens=64),
        ],
    )
    tilings = m.model_info_from(info).image_details
    assert [(t.detail, t.max_views, t.max_image_tokens) for t in tilings] == [("auto", 17, 1088), ("low", 1, 64)]
