"""`settings.current()`: read from the environment whenever what it reads changed, and
answered from the last read otherwise (it is asked for several times per video)."""

from __future__ import annotations

import pytest

from wan_tasks import settings


def test_current_is_read_once_until_a_variable_or_an_override_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WAN_TASKS_BUCKET", "first-bucket")
    first = settings.current()
    assert settings.current() is first  # nothing changed: not read again
    monkeypatch.setenv("WAN_TASKS_BUCKET", "second-bucket")
    assert settings.current().bucket == "second-bucket"
    monkeypatch.setenv("wan_tasks_claim_lease_s", "42")  # read case-insensitively, like pydantic
    assert settings.current().claim_lease_s == 42.0
    monkeypatch.setenv("SOMETHING_ELSE", "x")  # not a variable it reads
    same = settings.current()
    assert settings.current() is same
    with settings.override(bucket="override-bucket"):
        assert settings.current().bucket == "override-bucket"
    assert settings.current().bucket == "second-bucket"
    monkeypatch.delenv("WAN_TASKS_BUCKET")
    assert settings.current().bucket is None
