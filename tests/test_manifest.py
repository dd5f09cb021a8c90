"""Manifests: every bad row is reported with its row, field and rule; good rows always survive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAMPLE
from wan_tasks.api.models import LoraWeight
from wan_tasks.core.manifest import (
    ManifestError,
    ManifestItem,
    manifest_summary,
    parse_manifest,
)

REPO = SAMPLE.parents[2]
URL = "https://example.com/a.png"
GOOD = {"image": URL, "prompt": "a cat"}


def jsonl(*rows: dict[str, Any] | str | bytes) -> bytes:
    """One line per row: dicts as JSON, str/bytes as given (to write broken lines)."""
    lines = [
        r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
        for r in rows
    ]
    return b"\n".join(lines) + b"\n"


def csv_bytes(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


def only_error(items: list[ManifestItem]) -> str:
    bad = [i for i in items if not i.ok]
    assert len(bad) == 1, [i.error for i in items]
    assert bad[0].error is not None and bad[0].request is None
    return bad[0].error


# (case, manifest name, bytes, the words the single row error must contain)
BAD_ROWS: list[tuple[str, str, bytes, list[str]]] = [
    (
        "bad JSON line",
        "m.jsonl",
        jsonl(GOOD, '{"image": "x", "prompt": '),
        ["row 2:", "not valid JSON"],
    ),
    (
        "JSON line not an object",
        "m.jsonl",
        jsonl(GOOD, "[1, 2]"),
        ["row 2:", "not a JSON object", "array"],
    ),
    (
        "non-UTF-8 JSONL line",
        "m.jsonl",
        jsonl(GOOD, b'{"prompt": "caf\xe9"}'),
        ["row 2:", "not valid UTF-8", "0xe9"],
    ),
    (
        "unknown field in JSONL",
        "m.jsonl",
        jsonl(GOOD, {**GOOD, "negative_promt": "blur"}),
        ["row 2:", "negative_promt: Extra inputs are not permitted"],
    ),
    (
        "duplicate key in JSONL",
        "m.jsonl",
        jsonl(GOOD, f'{{"image": "{URL}", "prompt": "a", "prompt": "b"}}'),
        ["row 2:", "prompt: given twice"],
    ),
    (
        "missing prompt",
        "m.jsonl",
        jsonl(GOOD, {"image": URL}),
        ["row 2:", "prompt: Field required"],
    ),
    (
        "duration 6",
        "m.jsonl",
        jsonl(GOOD, {**GOOD, "duration": 6}),
        ["row 2:", "duration: Input should be 5 or 8"],
    ),
    (
        "lora scale out of range in JSONL",
        "m.jsonl",
        jsonl(GOOD, {**GOOD, "loras": [{"path": "p", "scale": 9}]}),
        ["row 2:", "loras.0.scale: Input should be less than or equal to 4"],
    ),
    (
        "bad id characters",
        "m.jsonl",
        jsonl(GOOD, {**GOOD, "id": "a b/c"}),
        ["row 2:", "id: must be 1-64 characters", "'a b/c'"],
    ),
    (
        "id too long",
        "m.jsonl",
        jsonl(GOOD, {**GOOD, "id": "x" * 65}),
        ["row 2:", "id: must be 1-64 characters"],
    ),
    ("id not a string", "m.jsonl", jsonl(GOOD, {**GOOD, "id": 7}), ["row 2:", "id: must be"]),
    (
        "variant not a string",
        "m.jsonl",
        jsonl(GOOD, {**GOOD, "variant": 2}),
        ["row 2:", "variant: must be a string"],
    ),
    (
        "duplicate id",
        "m.jsonl",
        jsonl({**GOOD, "id": "cat"}, {**GOOD, "id": "dog"}, {**GOOD, "id": "cat"}),
        ["row 3:", "duplicate id 'cat'", "row 1"],
    ),
    (
        "seed 'abc' in CSV",
        "m.csv",
        csv_bytes("image,prompt,seed", f"{URL},a,1", f"{URL},b,abc"),
        ["row 3:", "seed: must be integer text", "'abc'"],
    ),
    (
        "duration '5.0' in CSV",
        "m.csv",
        csv_bytes("image,prompt,duration", f"{URL},a,5.0"),
        ["row 2:", "duration: must be integer text", "'5.0'"],
    ),
    (
        "duration 6 in CSV",
        "m.csv",
        csv_bytes("image,prompt,duration", f"{URL},a,6"),
        ["row 2:", "duration: Input should be 5 or 8"],
    ),
    (
        "bad compact lora cell",
        "m.csv",
        csv_bytes("image,prompt,loras", f"{URL},a,x=heavy"),
        ["row 2:", "loras:", "'heavy' is not a number"],
    ),
    (
        "ambiguous URL lora without scale",
        "m.csv",
        csv_bytes("image,prompt,loras", f"{URL},a,https://h/l.safetensors?dl=1"),
        ["row 2:", "loras:", "ambiguous"],
    ),
    (
        "bad JSON lora cell",
        "m.csv",
        csv_bytes("image,prompt,low_noise_loras", f'{URL},a,"[{{""path"": ]"'),
        ["row 2:", "low_noise_loras: not valid JSON"],
    ),
    (
        "too many compact loras",
        "m.csv",
        csv_bytes("image,prompt,high_noise_loras", f"{URL},a,a;b;c;d"),
        ["row 2:", "high_noise_loras: List should have at most 3 items"],
    ),
    (
        "wrong number of cells",
        "m.csv",
        csv_bytes("image,prompt", f"{URL},a", f"{URL},b,extra"),
        ["row 3:", "has 3 cells; the header has 2 columns"],
    ),
    (
        "missing local image resolved against base_dir",
        "m.csv",
        csv_bytes("image,prompt", "missing.png,a", f"{URL},b"),
        ["row 2:", "image: Value error", "does not exist"],
    ),
]


@pytest.mark.parametrize(("case", "name", "data", "words"), BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_row_names_row_field_and_rule(
    case: str, name: str, data: bytes, words: list[str], tmp_path: Path
) -> None:
    items = parse_manifest(data, name=name, base_dir=tmp_path)
    error = only_error(items)
    for word in words:
        assert word in error, f"{case}: {error!r} does not say {word!r}"
    assert manifest_summary(items)["invalid"] == 1
    # Every other row of the same file is still valid.
    assert all(i.request is not None for i in items if i.error is None)


# (case, manifest name, bytes, extra keyword arguments, words the ManifestError must contain)
BAD_FILES: list[tuple[str, str, bytes, dict[str, Any], list[str]]] = [
    ("empty file", "m.jsonl", b"", {}, ["no rows"]),
    ("only blank lines", "m.jsonl", b"\n  \n\r\n", {}, ["no rows"]),
    ("empty CSV", "m.csv", b"", {}, ["empty", "no header"]),
    ("CSV header only", "m.csv", csv_bytes("image,prompt"), {}, ["no rows"]),
    ("unknown suffix", "m.txt", jsonl(GOOD), {}, ["'.txt'", ".jsonl", ".ndjson", ".csv"]),
    ("no suffix", "manifest", jsonl(GOOD), {}, ["(none)", ".jsonl"]),
    ("unknown explicit format", "m.jsonl", jsonl(GOOD), {"fmt": "xml"}, ["'xml'"]),
    (
        "unknown CSV column",
        "m.csv",
        csv_bytes("image,prompt,negative_promt", f"{URL},a,b"),
        {},
        ["'negative_promt'", "valid columns:", "negative_prompt", "variant"],
    ),
    (
        "unnamed CSV column",
        "m.csv",
        csv_bytes("image,prompt,", f"{URL},a,"),
        {},
        ["column(s) 3 have no name"],
    ),
    (
        "repeated CSV column",
        "m.csv",
        csv_bytes("image,prompt,prompt", f"{URL},a,b"),
        {},
        ["repeats", "'prompt'"],
    ),
    (
        "CSV without prompt column",
        "m.csv",
        csv_bytes("image,seed", f"{URL},1"),
        {},
        ["lacks required", "'prompt'"],
    ),
    (
        "too many JSONL rows",
        "m.jsonl",
        jsonl(GOOD, GOOD, GOOD),
        {"max_rows": 2},
        ["3 rows", "limit is 2"],
    ),
    (
        "too many CSV rows",
        "m.csv",
        csv_bytes("image,prompt", *[f"{URL},a"] * 3),
        {"max_rows": 2},
        ["more than 2 rows"],
    ),
    (
        "non-UTF-8 CSV",
        "m.csv",
        b"image,prompt\n" + f"{URL},ok\n".encode() + b"x,caf\xe9\n",
        {},
        ["not valid UTF-8", "0xe9", f"offset {13 + len(URL) + 4 + 5}", "line 3"],
    ),
]


@pytest.mark.parametrize(
    ("case", "name", "data", "kwargs", "words"), BAD_FILES, ids=[b[0] for b in BAD_FILES]
)
def test_unusable_manifest_raises(
    case: str, name: str, data: bytes, kwargs: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, name=name, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{name}: ")
    for word in words:
        assert word in message, f"{case}: {message!r} does not say {word!r}"


def test_manifest_over_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("wan_tasks.core.manifest.MAX_MANIFEST_BYTES", 10)
    with pytest.raises(ManifestError, match="the limit is 10 bytes"):
        parse_manifest(jsonl(GOOD), name="m.jsonl")


def test_good_jsonl_with_relative_path_and_loras(tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    (folder / "img").mkdir(parents=True)
    shutil.copy(SAMPLE, folder / "img" / "first.png")
    manifest = folder / "videos.ndjson"
    manifest.write_bytes(
        b"\xef\xbb\xbf"
        + jsonl(
            {
                "id": "cat-1",
                "image": "img/first.png",
                "prompt": "a cat",
                "duration": 8,
                "seed": 7,
                "loras": [{"path": "org/style", "scale": 0.8}],
                "variant": "b",
            },
            "",
            {
                "image": URL,
                "last_image": "img/first.png",
                "prompt": "a dog",
                "high_noise_loras": [{"path": "h"}],
            },
        )
    )
    items = parse_manifest(manifest.read_bytes(), name=manifest.name, base_dir=manifest.parent)
    assert [(i.row, i.item_id, i.variant, i.ok) for i in items] == [
        (1, "cat-1", "b", True),
        (3, "row-00003", "", True),
    ]
    first, second = (i.request for i in items)
    assert first is not None and second is not None
    assert first.image == str((folder / "img" / "first.png").resolve())
    assert (first.duration, first.seed) == (8, 7)
    assert first.loras == [LoraWeight(path="org/style", scale=0.8)]
    assert second.image == URL and second.last_image == first.image
    assert second.high_noise_loras == [LoraWeight(path="h", scale=1.0)]
    assert manifest_summary(items) == {"total": 2, "ok": 2, "invalid": 0}


def test_good_csv_with_compact_and_json_loras(tmp_path: Path) -> None:
    manifest = tmp_path / "videos.CSV"
    manifest.write_bytes(
        b"\xef\xbb\xbf"
        + csv_bytes(
            "id,image,prompt,negative_prompt,duration,seed,loras,high_noise_loras,low_noise_loras,"
            "variant",
            # A relative path to the packaged sample, resolved against the repository root.
            'one,wan_tasks/assets/sample.png,"a cat, walking",,5,,a=0.5; org/b ;,'
            '"[{""path"": ""https://h/x.safetensors?dl=1"", ""scale"": 1.5}]",'
            "https://h/y?dl=1=2,take-2",
            "",
            f' ,{URL},"a dog\nin two lines",blurry,8,-1,,,,',
            f"two,{URL},a bird,,,  42 ,,,,",
        )
    )
    items = parse_manifest(manifest.read_bytes(), name=manifest.name, base_dir=REPO)
    assert [(i.row, i.item_id, i.variant, i.error) for i in items] == [
        (2, "one", "take-2", None),
        (4, "row-00004", "", None),
        (6, "two", "", None),
    ]
    one, dog, bird = (i.request for i in items)
    assert one is not None and dog is not None and bird is not None
    assert one.image == str(SAMPLE.resolve())
    assert one.prompt == "a cat, walking" and one.negative_prompt == "" and one.seed == -1
    assert one.loras == [LoraWeight(path="a", scale=0.5), LoraWeight(path="org/b", scale=1.0)]
    assert one.high_noise_loras == [LoraWeight(path="https://h/x.safetensors?dl=1", scale=1.5)]
    assert one.low_noise_loras == [LoraWeight(path="https://h/y?dl=1", scale=2.0)]
    assert dog.prompt == "a dog\nin two lines" and (dog.duration, dog.seed) == (8, -1)
    assert dog.negative_prompt == "blurry"
    assert bird.seed == 42 and bird.duration == 5


def test_good_rows_survive_next_to_bad_ones_with_their_line_numbers() -> None:
    data = jsonl(
        GOOD,  # 1
        "not json",  # 2
        "",  # 3 (blank, skipped)
        {**GOOD, "duration": 6, "seed": -5},  # 4: two problems in one error
        b'{"prompt": "\xff"}',  # 5
        {**GOOD, "id": "ok-5"},  # 6
        "42",  # 7
        {**GOOD, "prompt": "last"},  # 8
    )
    items = parse_manifest(data, name="batch.jsonl")
    assert [(i.row, i.ok) for i in items] == [
        (1, True),
        (2, False),
        (4, False),
        (5, False),
        (6, True),
        (7, False),
        (8, True),
    ]
    by_row = {i.row: i for i in items}
    assert by_row[4].error == (
        "row 4: duration: Input should be 5 or 8; seed: Input should be greater than or equal to -1"
    )
    assert by_row[6].item_id == "ok-5"
    assert by_row[8].request is not None and by_row[8].request.prompt == "last"
    assert manifest_summary(items) == {"total": 7, "ok": 3, "invalid": 4}


def test_csv_rows_survive_bad_ones_and_report_the_editor_line() -> None:
    data = csv_bytes(
        "image,prompt,duration",  # 1
        f"{URL},good,5",  # 2
        f'{URL},"multi',  # 3: a quoted cell spanning lines 3-4
        'line",6',  # 4
        "",  # 5
        f"{URL},,5",  # 6: empty prompt cell means "not given"
        f"{URL},also good,8",  # 7
    )
    items = parse_manifest(data, name="m.csv")
    assert [(i.row, i.ok) for i in items] == [(2, True), (3, False), (6, False), (7, True)]
    assert items[1].error == "row 3: duration: Input should be 5 or 8"
    assert items[2].error == "row 6: prompt: Field required"


def test_explicit_format_overrides_suffix() -> None:
    items = parse_manifest(csv_bytes("image,prompt", f"{URL},a"), name="upload.bin", fmt="csv")
    assert items[0].ok


def test_manifest_item_holds_exactly_one_outcome() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ManifestItem(row=1, item_id="x", request=None, error=None)


@pytest.mark.parametrize(
    ("row", "words"),
    [
        (
            '{{"image": "{}", "prompt": "p", "seed": {}}}'.format(URL, "1" * 5000),
            ["seed:", "5000 digits"],
        ),
        (
            f'{{"image": "{URL}", "prompt": "p", "duration": 1e999}}',
            ["duration:", "too large"],
        ),
        (f'{{"image": "{URL}", "prompt": "p", "seed": Infinity}}', ["seed:", "Infinity"]),
        (
            f'{{"image": "{URL}", "prompt": "p", '
            '"high_noise_loras": [{"path": "a", "scale": NaN}]}',
            ["high_noise_loras.0.scale:", "NaN"],
        ),
        ("[" * 50_000, ["not valid JSON"]),
        (f'{{"image": "{URL}", "prompt": "\\u0000\\u200b"}}', ["prompt:", "blank"]),
    ],
    ids=["huge int", "huge float", "Infinity", "nested NaN", "deep nesting", "invisible prompt"],
)
def test_one_hostile_value_costs_only_its_row(row: str, words: list[str]) -> None:
    good = json.dumps({"image": URL, "prompt": "fine"})
    items = parse_manifest(
        f"{good}\n{row}\n{good.replace('fine', 'also fine')}".encode(), name="m.jsonl"
    )
    assert [i.ok for i in items] == [True, False, True]
    error = items[1].error or ""
    assert error.startswith("row 2: ")
    for word in words:
        assert word in error


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
@pytest.mark.parametrize("name", ["m.jsonl", "m.csv"])
def test_wide_unicode_files_are_refused_as_a_whole(encoding: str, name: str) -> None:
    text = f"image,prompt\n{URL},p\n" if name.endswith(".csv") else jsonl(GOOD).decode()
    with pytest.raises(ManifestError, match="save it as UTF-8"):
        parse_manifest(text.encode(encoding), name=name)


def test_csv_cell_over_the_csv_module_limit_is_a_row_error() -> None:
    data = csv_bytes("image,prompt", f"{URL},{'x' * 200_000}", f"{URL},fine")
    items = parse_manifest(data, name="m.csv")
    assert [i.ok for i in items] == [False, True]
    assert "row 2: prompt:" in (items[0].error or "")
