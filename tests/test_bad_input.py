"""The bad-input table: every case is rejected locally, naming the field, and costs no call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from reliability.bad_input import CASES, VALID, Case, Valid, accept, check
from tests.conftest import Stack
from tests.test_flows import FAST
from wan_tasks.flows.generate import generate_batch


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_is_rejected_with_field_and_rule(case: Case, tmp_path: Path) -> None:
    outcome = check(case, tmp_path)
    assert outcome.rejected, f"{case.name} was accepted"
    assert outcome.ok, f"{case.name}: {outcome.message!r} lacks {case.field!r}/{case.rule!r}"


@pytest.mark.parametrize("valid", VALID, ids=[v.name for v in VALID])
def test_unusual_but_valid_input_is_accepted(valid: Valid, tmp_path: Path) -> None:
    accepted, why = accept(valid, tmp_path)
    assert accepted, f"{valid.name} was refused: {why}"


def test_the_table_covers_every_class_of_issue_14() -> None:
    names = " ".join(c.name for c in CASES).lower()
    for word in (
        "zero-width",
        "ansi",
        "nul",
        "url with a space",
        "30000x30000",
        "corrupt",
        "truncated",
        "5000 digits",
        "nan",
        "api key",
        "signed url",
    ):
        assert word in names, f"no bad-input case for {word!r}"
    assert len([v for v in VALID if v.kind == "file"]) >= 12


def test_bad_rows_cost_no_calls_and_the_rest_runs(stack: Stack, tmp_path: Path) -> None:
    rows = []
    for i, case in enumerate(c for c in CASES if c.kind in ("request", "file")):
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        fields = case.build(folder)
        rows.append(json.dumps({"id": f"bad-{i}", **fields}, default=str))
    for i in range(2):
        # An image each: a client uploads one image once however many rows use it.
        image = tmp_path / f"good-{i}.png"
        Image.new("RGB", (64, 48), (40 * i, 90, 160)).save(image)
        rows.append(
            json.dumps(
                {"id": f"good-{i}", "image": str(image), "prompt": f"test bad-input neighbour {i}"}
            )
        )
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    report = generate_batch(str(manifest), options=FAST, fail_on_item_error=False)
    bad = len(rows) - 2
    assert (report.archived, report.invalid, report.failed) == (2, bad, 0)
    stats = stack.stats()
    # Only the two good rows touched the service: one upload and one submit each.
    assert (stats["submissions"], stats["uploads"]) == (2, 2)
    assert all(
        o.error and o.error.startswith("row ") for o in report.outcomes if o.status == "invalid"
    )
