"""Batch manifests: many video requests in one JSONL or CSV file.

A manifest is parsed row by row so that one bad row never costs the good ones: every row
becomes a `ManifestItem` holding either a validated `I2VRequest` or an error that names the
row, the field and the rule broken. Only problems that make the whole file unusable (unknown
format, no rows, a header typo that would affect every row, too many rows, too big, a CSV that
is not UTF-8) raise `ManifestError`.

Any exception while reading or checking one row becomes that row's error: an integer of 5,000
digits, NaN, a number too large for a float, JSON nested 100,000 deep, an image that is a
decompression bomb. Errors quote a user's value only through `quote_value`, so a credential
pasted into a cell is never echoed into logs, summaries or artifacts.

Row numbers are the line a person sees in an editor: the line of a JSONL object, or the line
on which a CSV record starts (the header is line 1).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

from pydantic import ValidationError

from wan_tasks.api.media import is_url
from wan_tasks.api.models import I2VRequest
from wan_tasks.api.text import looks_like_secret, quote_value
from wan_tasks.errors import ManifestError

__all__ = [
    "MAX_MANIFEST_BYTES",
    "ManifestError",
    "ManifestFormat",
    "ManifestItem",
    "manifest_summary",
    "parse_manifest",
]

log = logging.getLogger(__name__)

ManifestFormat = Literal["jsonl", "csv"]

# Whole-file bound, checked before any parsing: 100,000 rows with long prompts fit easily,
# while a wrongly chosen multi-GB file is refused instead of exhausting memory.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024

_SUFFIXES: dict[str, ManifestFormat] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_REQUEST_FIELDS: tuple[str, ...] = tuple(I2VRequest.model_fields)
_REQUIRED_FIELDS: tuple[str, ...] = tuple(
    name for name, info in I2VRequest.model_fields.items() if info.is_required()
)
_COLUMNS: tuple[str, ...] = (*_REQUEST_FIELDS, "id", "variant")
_INT_FIELDS = frozenset({"duration", "seed"})
_LORA_FIELDS = frozenset({"loras", "high_noise_loras", "low_noise_loras"})
_IMAGE_FIELDS = ("image", "last_image")
_KNOWN_KEYS = frozenset({*_COLUMNS, "path", "scale"})
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")
_OTHER_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://|data:", re.IGNORECASE)

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# ASCII only: int() would also take "1_000" or non-ASCII digits, which no one means in a cell.
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# No field takes an integer beyond 2**31; a longer one is refused before int() is asked to
# convert it (Python refuses 4,300+ digits with a ValueError of its own).
_MAX_INT_DIGITS = 20
# UTF-16/32 files (Excel's "Unicode text") are whole-file problems: every line would fail.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


@dataclass(frozen=True)
class ManifestItem:
    """One row of a manifest: a valid request, or the reason it is not one."""

    row: int
    item_id: str
    request: I2VRequest | None
    error: str | None
    variant: str = ""

    def __post_init__(self) -> None:
        if (self.request is None) == (self.error is None):
            raise ValueError("a ManifestItem has exactly one of request and error")

    @property
    def ok(self) -> bool:
        return self.request is not None


@dataclass
class _RawRow:
    """A row read from the file, before id checks and model validation.

    `fields` is None when the row could not even be read (bad JSON, not UTF-8, wrong number
    of cells); `problems` already holds the reason then.
    """

    row: int
    fields: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)


class _DuplicateKeyError(ValueError):
    pass


@dataclass(frozen=True)
class _BadNumber:
    """Stands in for a JSON number no field can take, so the error can name its field."""

    what: str


def _json_int(text: str) -> int | _BadNumber:
    digits = len(text.lstrip("-"))
    if digits > _MAX_INT_DIGITS:
        return _BadNumber(f"an integer of {digits} digits is out of range")
    return int(text)


def _json_float(text: str) -> float | _BadNumber:
    value = float(text)
    if math.isfinite(value):
        return value
    return _BadNumber(f"a number of {len(text)} characters is too large for a float")


def _json_constant(text: str) -> _BadNumber:
    return _BadNumber(f"{text} is not a number JSON allows")


def _loads(text: str) -> Any:
    return json.loads(
        text,
        object_pairs_hook=_unique_keys,
        parse_int=_json_int,
        parse_float=_json_float,
        parse_constant=_json_constant,
    )


def _bad_numbers(value: Any, loc: str = "") -> list[tuple[str, str]]:
    if isinstance(value, _BadNumber):
        return [(loc, value.what)]
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _bad_numbers(item, f"{loc}.{key}" if loc else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _bad_numbers(item, f"{loc}.{index}" if loc else str(index))
    return found


def parse_manifest(
    data: bytes,
    *,
    name: str,
    fmt: ManifestFormat | None = None,
    base_dir: Path | None = None,
    max_rows: int = 100_000,
) -> list[ManifestItem]:
    """Parse a JSONL or CSV manifest into one `ManifestItem` per non-blank row.

    `name` picks the format from its suffix unless `fmt` is given, and prefixes whole-file
    errors. Relative local image paths are resolved against `base_dir` (normally the
    manifest's folder) when it is given, else they stay relative to the working directory.
    Raises ManifestError when the file as a whole is unusable.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    chosen = _detect_format(name, fmt)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{name}: manifest is {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES} bytes"
        )
    raw_rows = (
        _read_jsonl(data, name, max_rows) if chosen == "jsonl" else _read_csv(data, name, max_rows)
    )
    if not raw_rows:
        raise ManifestError(f"{name}: manifest has no rows")
    items = _build_items(raw_rows, base_dir)
    summary = manifest_summary(items)
    log.info(
        "parsed %s manifest %s: %d rows, %d valid, %d invalid",
        chosen,
        name,
        summary["total"],
        summary["ok"],
        summary["invalid"],
    )
    return items


def manifest_summary(items: Iterable[ManifestItem]) -> dict[str, int]:
    """Counts of all, valid and invalid rows."""
    total = ok = 0
    for item in items:
        total += 1
        ok += item.ok
    return {"total": total, "ok": ok, "invalid": total - ok}


def _detect_format(name: str, fmt: str | None) -> ManifestFormat:
    choices = ", ".join(_SUFFIXES)
    if fmt is not None:
        # The Literal only guards typed callers; a CLI may pass any string through.
        if fmt == "jsonl":
            return "jsonl"
        if fmt == "csv":
            return "csv"
        raise ManifestError(f"{name}: unknown manifest format {fmt!r}; use 'jsonl' or 'csv'")
    suffix = PurePath(name).suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    shown = repr(suffix) if suffix else "(none)"
    raise ManifestError(
        f"{name}: unknown manifest suffix {shown}; use one of {choices} or pass the format"
    )


def _check_encoding(data: bytes, name: str) -> None:
    for bom, encoding in _WIDE_BOMS:
        if data.startswith(bom):
            raise ManifestError(f"{name}: the file is {encoding} text; save it as UTF-8")


def _read_jsonl(data: bytes, name: str, max_rows: int) -> list[_RawRow]:
    _check_encoding(data, name)
    # JSON strings cannot hold a raw newline, so splitting bytes on b"\n" never cuts an
    # object; splitting before decoding keeps one non-UTF-8 line from sinking the file.
    lines = data.split(b"\n")
    count = sum(1 for line in lines if line.strip())
    if count > max_rows:
        raise ManifestError(f"{name}: manifest has {count} rows; the limit is {max_rows}")
    rows: list[_RawRow] = []
    for number, raw_line in enumerate(lines, start=1):
        # A BOM may start any line of files that were concatenated, not only the first.
        line = raw_line.removeprefix(codecs.BOM_UTF8)
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append(
                _RawRow(
                    number,
                    None,
                    [f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"],
                )
            )
            continue
        try:
            value = _loads(text)
        except json.JSONDecodeError as exc:
            rows.append(_RawRow(number, None, [f"not valid JSON: {exc.msg} (column {exc.colno})"]))
            continue
        except _DuplicateKeyError as exc:
            rows.append(_RawRow(number, None, [str(exc)]))
            continue
        except RecursionError:
            rows.append(_RawRow(number, None, ["not valid JSON: nested too deeply"]))
            continue
        except Exception as exc:  # one line's oddity must not sink the other rows
            rows.append(_RawRow(number, None, [f"not valid JSON ({type(exc).__name__})"]))
            continue
        if not isinstance(value, dict):
            rows.append(
                _RawRow(
                    number,
                    None,
                    [f"not a JSON object (got {_json_type(value)}); each line must be {{...}}"],
                )
            )
            continue
        rows.append(_RawRow(number, value))
    return rows


def _read_csv(data: bytes, name: str, max_rows: int) -> list[_RawRow]:
    _check_encoding(data, name)
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        # Quoted cells may span lines, so a CSV cannot be cut into rows before decoding;
        # say exactly where the bad byte is so it can be fixed.
        offset = exc.start + bom
        line = data.count(b"\n", 0, offset) + 1
        raise ManifestError(
            f"{name}: not valid UTF-8: byte 0x{data[offset]:02x} at offset {offset} "
            f"(line {line}); save the CSV as UTF-8"
        ) from exc
    # The csv module refuses cells over 128 KiB with an error that would sink the whole file;
    # a long cell is a row problem (the model's length rules name it). The limit is
    # process-wide, so it is only ever raised, never lowered again.
    if csv.field_size_limit() < len(text):
        csv.field_size_limit(len(text) + 1)
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[_RawRow] = []
    line_before = 0
    try:
        for record in reader:
            start, line_before = line_before + 1, reader.line_num
            # Spreadsheets often export trailing empty lines or rows of bare commas.
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = _check_header(record, name)
                continue
            if len(rows) >= max_rows:
                raise ManifestError(f"{name}: manifest has more than {max_rows} rows")
            rows.append(_csv_row(start, header, record))
    except csv.Error as exc:
        raise ManifestError(f"{name}: line {reader.line_num}: malformed CSV: {exc}") from exc
    if header is None:
        raise ManifestError(f"{name}: manifest is empty (no header row)")
    return rows


def _check_header(record: list[str], name: str) -> list[str]:
    """A header problem would break every row the same way, so it fails the whole file."""
    header = [cell.strip() for cell in record]
    valid = ", ".join(_COLUMNS)
    blank = [str(i) for i, col in enumerate(header, start=1) if not col]
    if blank:
        raise ManifestError(
            f"{name}: header column(s) {', '.join(blank)} have no name; valid columns: {valid}"
        )
    unknown = [col for col in header if col not in _COLUMNS]
    if unknown:
        # A header-less CSV makes its first data row the header: its cells may be secrets.
        shown = ", ".join(
            f"{quote_value(col)} (column {i})"
            for i, col in enumerate(header, start=1)
            if col not in _COLUMNS
        )
        raise ManifestError(f"{name}: unknown header column(s) {shown}; valid columns: {valid}")
    repeated = sorted({col for col in header if header.count(col) > 1})
    if repeated:
        raise ManifestError(f"{name}: header repeats column(s) {', '.join(map(repr, repeated))}")
    missing = [col for col in _REQUIRED_FIELDS if col not in header]
    if missing:
        raise ManifestError(
            f"{name}: header lacks required column(s) {', '.join(map(repr, missing))}"
        )
    return header


def _csv_row(row: int, header: list[str], record: list[str]) -> _RawRow:
    if len(record) != len(header):
        return _RawRow(
            row, None, [f"has {len(record)} cells; the header has {len(header)} columns"]
        )
    fields: dict[str, Any] = {}
    problems: list[str] = []
    for column, cell in zip(header, record, strict=True):
        if not cell.strip():
            continue  # an empty cell means "not given": the model default applies
        try:
            fields[column] = _convert_cell(column, cell)
        except ValueError as exc:
            problems.append(f"{column}: {exc}")
    return _RawRow(row, fields, problems)


def _convert_cell(column: str, cell: str) -> Any:
    if column in _INT_FIELDS:
        text = cell.strip()
        if not _INT_TEXT.fullmatch(text):
            raise ValueError(f"must be integer text such as 5, not {quote_value(cell)}")
        digits = len(text.lstrip("+-"))
        if digits > _MAX_INT_DIGITS:
            raise ValueError(f"an integer of {digits} digits is out of range")
        return int(text)
    if column in _LORA_FIELDS:
        return _parse_loras(cell)
    return cell


def _parse_loras(cell: str) -> Any:
    """A LoRA cell: JSON (`[{"path": ..., "scale": ...}]`) or `path=scale;path=scale`.

    Returns what the model validates (so its rules and messages apply); raises ValueError
    for text that is neither form.
    """
    text = cell.strip()
    if text.startswith(("[", "{")):
        try:
            value = _loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc.msg} (column {exc.colno})") from exc
        except _DuplicateKeyError:
            raise
        except RecursionError as exc:
            raise ValueError("not valid JSON: nested too deeply") from exc
        except Exception as exc:
            raise ValueError(f"not valid JSON ({type(exc).__name__})") from exc
        bad = _bad_numbers(value)
        if bad:
            raise ValueError("; ".join(f"{loc}: {what}" if loc else what for loc, what in bad))
        return value
    hint = "write path=scale;path=scale (e.g. my-lora=0.8) or a JSON list"
    loras: list[dict[str, Any]] = []
    for raw_entry in text.split(";"):
        entry = raw_entry.strip()
        if not entry:
            continue
        path, sep, scale_text = entry.rpartition("=")
        if not sep:
            loras.append({"path": entry})
            continue
        path, scale_text = path.strip(), scale_text.strip()
        if not _DECIMAL_TEXT.fullmatch(scale_text):
            raise ValueError(
                f"entry {quote_value(entry)}: scale {quote_value(scale_text)} is not a "
                f"number; {hint}"
            )
        # "https://h/l?dl=1" would otherwise silently become path "https://h/l?dl", scale 1:
        # a URL whose last query parameter lost its "=" means the scale was not written.
        if "?" in path and "=" not in re.split(r"[?&]", path)[-1]:
            raise ValueError(
                f"entry {quote_value(entry)} is ambiguous: a path containing '=' needs an explicit "
                "scale (path=1.0) or the JSON form"
            )
        loras.append({"path": path, "scale": float(scale_text)})
    return loras


def _build_items(raw_rows: list[_RawRow], base_dir: Path | None) -> list[ManifestItem]:
    items: list[ManifestItem] = []
    first_row_of: dict[str, int] = {}
    for raw in raw_rows:
        problems = list(raw.problems)
        item_id = f"row-{raw.row:05d}"
        variant = ""
        request: I2VRequest | None = None
        if raw.fields is not None:
            try:
                item_id, variant, request = _check_row(raw.fields, base_dir, problems, item_id)
            except Exception as exc:
                # Whatever went wrong is this row's problem only; its type, not its text,
                # which could quote the row's values.
                log.debug("row %d: unexpected %s while checking it", raw.row, type(exc).__name__)
                problems.append(f"could not be checked ({type(exc).__name__})")
                request = None
        earlier = first_row_of.setdefault(item_id, raw.row)
        if earlier != raw.row:
            problems.append(f"duplicate id {quote_value(item_id)} (already used on row {earlier})")
        if problems:
            items.append(
                ManifestItem(
                    raw.row, item_id, None, f"row {raw.row}: {'; '.join(problems)}", variant
                )
            )
        else:
            items.append(ManifestItem(raw.row, item_id, request, None, variant))
    return items


def _check_row(
    raw_fields: dict[str, Any], base_dir: Path | None, problems: list[str], item_id: str
) -> tuple[str, str, I2VRequest | None]:
    """Validate one row's fields; append its problems; return (id, variant, request)."""
    fields = dict(raw_fields)
    variant = ""
    given_id = fields.pop("id", None)
    if given_id is not None:
        if isinstance(given_id, str) and _ID_RE.fullmatch(given_id):
            if looks_like_secret(given_id):
                # An id travels into object keys, reports and logs by design.
                problems.insert(0, f"id: {quote_value(given_id)}; choose an id that is not")
            else:
                item_id = given_id
        else:
            problems.insert(
                0,
                (
                    "id: must be 1-64 characters of letters, digits, '.', '_' or '-', "
                    f"not {quote_value(given_id)}"
                ),
            )
    given_variant = fields.pop("variant", None)
    if given_variant is not None:
        if isinstance(given_variant, str):
            variant = given_variant
        else:
            problems.append(f"variant: must be a string, not {_json_type(given_variant)}")
    bad_numbers = _bad_numbers(fields)
    for loc, what in bad_numbers:
        problems.append(f"{_safe_loc(loc.split('.'))}: {what}")
    _resolve_images(fields, base_dir)
    try:
        request = I2VRequest.model_validate(fields)
    except ValidationError as exc:
        bad_locs = {loc for loc, _ in bad_numbers}
        problems.extend(_describe(exc, skip=bad_locs))
        return item_id, variant, None
    except OSError as exc:
        # An unreadable image (permissions, I/O error) is this row's problem only.
        problems.append(f"cannot read a local image ({type(exc).__name__}: {exc.strerror})")
        return item_id, variant, None
    return item_id, variant, request


def _resolve_images(fields: dict[str, Any], base_dir: Path | None) -> None:
    """Make relative local image paths relative to the manifest, not the working directory."""
    if base_dir is None:
        return
    for name in _IMAGE_FIELDS:
        value = fields.get(name)
        if not isinstance(value, str) or not value.strip():
            continue  # wrong types and blanks are left for the model to report
        text = value.strip()
        if is_url(text) or _OTHER_URL.match(text):  # `take:1.png` is a file, not a URL
            continue
        path = Path(text).expanduser()
        if not path.is_absolute():
            fields[name] = str(base_dir / path)


def _describe(exc: ValidationError, skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        if ".".join(str(part) for part in error["loc"]) in skip:
            continue  # already reported with a better reason
        loc = _safe_loc(error["loc"])
        problems.append(f"{loc}: {error['msg']}" if loc else error["msg"])
    return problems


def _safe_loc(parts: Iterable[Any]) -> str:
    """A field path for a message; a key that is no known field (a typo, or a pasted
    secret used as a key) is quoted only when safe."""
    shown = []
    for part in parts:
        text = str(part)
        plain = (
            isinstance(part, int)
            or text in _KNOWN_KEYS
            or (_PLAIN_KEY.fullmatch(text) is not None and not looks_like_secret(text))
        )
        shown.append(text if plain else quote_value(text))
    return ".".join(shown)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a repeated key would otherwise silently keep only its last value."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            shown = _safe_loc([key])
            raise _DuplicateKeyError(f"{shown}: given twice in the same object")
        result[key] = value
    return result


def _json_type(value: Any) -> str:
    names = {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def parse_lora_cell(cell: str, field: str) -> Any:
    """A LoRA list written as `path=scale;path=scale` or JSON (as in a CSV cell or on a
    command line); ValueError names the field."""
    try:
        return _parse_loras(cell)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None
