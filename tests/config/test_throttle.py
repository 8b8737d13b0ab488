"""The per-user API throttle: DRF's sliding window, kept in process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from config.throttling import UserRateThrottle
from tests.helpers import unique


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def throttle(monkeypatch):
    """A 3-per-minute throttle on a fake clock, with its own history store."""
    clock = Clock()

    class ThreePerMinute(UserRateThrottle):
        rate = "3/minute"
        histories: dict = {}
        timer = staticmethod(clock)

    return ThreePerMinute, clock


def _request(user_id: int) -> SimpleNamespace:
    return SimpleNamespace(user=SimpleNamespace(is_authenticated=True, pk=user_id))


def test_the_request_over_the_rate_is_refused_until_the_window_slides(throttle):
    cls, clock = throttle
    request = _request(1)
    for step in range(3):
        clock.now = 1_000.0 + step * 10
        assert cls().allow_request(request, None) is True
    clock.now = 1_030.0
    refused = cls()
    assert refused.allow_request(request, None) is False
    # The oldest request (t=1000) leaves the window at t=1060; one slot then.
    assert refused.wait() == pytest.approx(30.0)
    clock.now = 1_059.9
    assert cls().allow_request(request, None) is False
    clock.now = 1_060.0
    assert cls().allow_request(request, None) is True
    assert cls().allow_request(request, None) is False


def test_each_user_has_its_own_window(throttle):
    cls, _ = throttle
    for _ in range(3):
        assert cls().allow_request(_request(1), None) is True
    assert cls().allow_request(_request(1), None) is False
    assert cls().allow_request(_request(2), None) is True


def test_idle_keys_are_dropped_when_there_are_too_many(throttle):
    cls, clock = throttle
    cls.max_keys = 2
    cls().allow_request(_request(1), None)
    clock.now += 61  # user 1 idle for longer than the window
    cls().allow_request(_request(2), None)
    cls().allow_request(_request(3), None)
    assert set(cls.histories) == {"throttle_user_2", "throttle_user_3"}


@pytest.mark.django_db
def test_the_api_answers_429_with_retry_after(settings, monkeypatch):
    """Through a real view: DRF's 429 and Retry-After, from this throttle."""
    from django.contrib.auth import get_user_model
    from knox.models import AuthToken
    from rest_framework.test import APIClient

    from integration.api.views import RunViewSet

    clock = Clock()

    class OnePerHour(UserRateThrottle):
        rate = "1/hour"
        histories: dict = {}
        timer = staticmethod(clock)

    monkeypatch.setattr(RunViewSet, "throttle_classes", [OnePerHour])
    user = get_user_model().objects.create_user(unique("throttled"))
    _, token = AuthToken.objects.create(user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/v1/runs/").status_code == 200
    clock.now += 600
    refused = client.get("/api/v1/runs/")
    assert refused.status_code == 429
    assert refused["Retry-After"] == "3000"
