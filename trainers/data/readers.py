"""Read training files into records: JSONL / JSON / CSV / TSV / CoNLL, chat and alpaca forms.

The boundary: files in, `trainers.data.records` out. Readers validate everything they can see in
the file (fields, types, tag schemes, empty files) and report every problem at once as one
`trainers.errors.DataError` naming `file:line`, before any model is loaded. They know nothing about
tokenizers or models. Compressed files (`.gz`) are read transparently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainers.data.records import (
    ROLES,
    ChatRecord,
    Message,
    Origin,
    TextRecord,
    TokensRecord,
)
from trainers.errors import DataError

MAX_REPORTED = 20
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TAG_PATTERN = re.compile(r"^(O|[BI]-\S+)$")


class Problems:
    """Collects `file:line: problem` lines so a reader can report all of them in one error."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.count = 0

    def add(self, origin: Origin | str, problem: str) -> None:
        self.count += 1
        if len(self.lines) < MAX_REPORTED:
            self.lines.append(f"{origin}: {problem}")

    def __bool__(self) -> bool:
        return self.count > 0

    def raise_if_any(self, remedy: str | None = None) -> None:
        """Raise one DataError listing every collected problem (the first MAX_REPORTED of them)."""
        if not self.count:
            return
        more = f"\n  ... and {self.count - len(self.lines)} more" if self.count > MAX_REPORTED else ""
        noun = "problem" if self.count == 1 else "problems"
        message = f"{self.count} data {noun}:\n  " + "\n  ".join(self.lines) + more + "\n"
        raise DataError(message, remedy)


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise DataError(f"{path}: no such file.", "Check the --data / --eval path.")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open(encoding="utf-8", newline="")


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    return suffixes[-1] if suffixes else ""


def _empty(path: Path) -> DataError:
    return DataError(f"{path}: the file holds no records.", "Point --data/--eval at a non-empty file.")


# ---- generic rows --------------------------------------------------------------------------------


def iter_json_rows(
    path: str | Path, problems: Problems | None = None
) -> Iterator[tuple[Origin, dict[str, Any]]]:
    """Yield `(origin, object)` for each row of a JSONL file or a JSON list file.

    Lines that are not JSON objects are added to `problems` (so the caller reports them together
    with its own), or raised at once when `problems` is None.

    Raises:
        DataError: unreadable lines, rows that are not objects, or an empty file (all at once).
    """
    path = Path(path)
    with _open_text(path) as handle:
        text = handle.read()
    stripped = text.lstrip()
    own = problems is None
    problems = Problems() if problems is None else problems
    rows: list[tuple[Origin, dict[str, Any]]] = []
    if stripped.startswith("["):  # a JSON list (alpaca style): line numbers of each object's start
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from err
        starts = _object_start_lines(text)
        for index, item in enumerate(data):
            origin = Origin(str(path), starts[index] if index < len(starts) else 0)
            if not isinstance(item, dict):
                problems.add(origin, f"item {index} is {type(item).__name__}, expected an object")
            else:
                rows.append((origin, item))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            origin = Origin(str(path), number)
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                problems.add(origin, f"not a JSON line ({err.msg})")
                continue
            if not isinstance(item, dict):
                problems.add(origin, f"a JSON {type(item).__name__}, expected an object")
                continue
            rows.append((origin, item))
    if own:
        problems.raise_if_any()
    if not rows and not problems:
        raise _empty(path)
    yield from rows


def _object_start_lines(text: str) -> list[int]:
    """1-based line numbers where each top-level object of a JSON list begins."""
    lines, depth, line, in_string, escaped = [], 0, 1, False, False
    for char in text:
        if char == "\n":
            line += 1
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            if depth == 1 and char == "{":
                lines.append(line)
            depth += 1
        elif char in "]}":
            depth -= 1
    return lines


def iter_table_rows(path: str | Path) -> Iterator[tuple[Origin, dict[str, Any]]]:
    """Yield `(origin, row)` for a CSV or TSV file with a header line (delimiter by suffix)."""
    path = Path(path)
    delimiter = "\t" if _base_suffix(path) == ".tsv" else ","
    with _open_text(path) as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
        rows = [(Origin(str(path), reader.line_num), row) for row in reader]
    if not rows:
        raise _empty(path)
    yield from rows


def iter_rows(path: str | Path, problems: Problems | None = None) -> Iterator[tuple[Origin, dict[str, Any]]]:
    """Rows of any tabular or JSON file, chosen by suffix (.jsonl/.json/.ndjson, .csv, .tsv)."""
    suffix = _base_suffix(Path(path))
    if suffix in (".csv", ".tsv"):
        return iter_table_rows(path)
    if suffix in JSON_SUFFIXES:
        return iter_json_rows(path, problems)
    raise DataError(
        f"{path}: unknown file type {suffix!r}.",
        "Use .jsonl, .json, .csv or .tsv (and .conll/.txt for NER columns).",
    )


# ---- classification ------------------------------------------------------------------------------


def read_classification(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> list[TextRecord]:
    """Read `(text, label)` rows from JSONL, JSON, CSV or TSV; integer labels become strings.

    Raises:
        DataError: missing or empty fields, labels that are not strings or integers, empty file.
    """
    problems, records = Problems(), []
    for origin, row in iter_rows(path, problems):
        text, label = row.get(text_field), row.get(label_field)
        if text_field not in row or label_field not in row:
            missing = [f for f in (text_field, label_field) if f not in row]
            problems.add(origin, f"missing field {', '.join(map(repr, missing))}")
            continue
        if not isinstance(text, str) or not text.strip():
            problems.add(origin, f"field {text_field!r} must be a non-empty string")
            continue
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
            problems.add(origin, f"field {label_field!r} must be a string or an integer")
            continue
        records.append(TextRecord(text=text, label=str(label).strip(), origin=origin))
    problems.raise_if_any("Fix the listed rows, or pass --text-field / --label-field.")
    return records


# ---- NER -----------------------------------------------------------------------------------------


def read_ner(path: str | Path) -> list[TokensRecord]:
    """Read sentences from CoNLL columns (token first, tag last) or JSONL with `tokens` and `tags`.

    CoNLL: blank lines separate sentences and `-DOCSTART-` lines are skipped. Tags must be `O`,
    `B-TYPE` or `I-TYPE` (BIO or IOB1; normalised later to BIO).

    Raises:
        DataError: malformed lines, unknown tag schemes (e.g. BIOES `S-`/`E-`), empty file.
    """
    if _base_suffix(Path(path)) in JSON_SUFFIXES:
        return _read_ner_json(Path(path))
    return _read_conll(Path(path))


def _check_tags(tags: list[str], origins: list[Origin], problems: Problems) -> bool:
    ok = True
    for tag, origin in zip(tags, origins, strict=True):
        if not TAG_PATTERN.match(tag):
            hint = " (BIOES tags are not supported)" if tag[:2] in ("S-", "E-", "L-", "U-") else ""
            problems.add(origin, f"unknown tag scheme: tag {tag!r}{hint}; expected O, B-TYPE or I-TYPE")
            ok = False
    return ok


def _read_conll(path: Path) -> list[TokensRecord]:
    problems, records = Problems(), []
    tokens: list[str] = []
    tags: list[str] = []
    origins: list[Origin] = []

    def flush() -> None:
        if tokens and _check_tags(tags, origins, problems):
            records.append(TokensRecord(tuple(tokens), tuple(tags), origins[0]))
        tokens.clear(), tags.clear(), origins.clear()

    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            columns = line.split()
            if not columns:
                flush()
                continue
            if columns[0] == "-DOCSTART-":
                continue
            origin = Origin(str(path), number)
            if len(columns) < 2:
                problems.add(origin, "expected a token and a tag separated by whitespace")
                continue
            tokens.append(columns[0])
            tags.append(columns[-1])
            origins.append(origin)
    flush()
    problems.raise_if_any("CoNLL files have one `token ... tag` per line, a blank line between sentences.")
    if not records:
        raise _empty(path)
    return records


def _read_ner_json(path: Path) -> list[TokensRecord]:
    problems, records = Problems(), []
    for origin, row in iter_json_rows(path, problems):
        tokens, tags = row.get("tokens"), row.get("tags", row.get("ner_tags"))
        if not _is_str_list(tokens) or not _is_str_list(tags):
            problems.add(origin, "needs 'tokens' and 'tags' as non-empty lists of strings")
            continue
        if len(tokens) != len(tags):
            problems.add(origin, f"{len(tokens)} tokens but {len(tags)} tags")
            continue
        if _check_tags(tags, [origin] * len(tags), problems):
            records.append(TokensRecord(tuple(tokens), tuple(tags), origin))
    problems.raise_if_any()
    return records


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


# ---- instruction ---------------------------------------------------------------------------------


def parse_messages(value: Any, origin: Origin, problems: Problems) -> tuple[Message, ...] | None:
    """Validate a chat `messages` list of role/content objects; None after reporting problems."""
    if not isinstance(value, list) or not value:
        problems.add(origin, "'messages' must be a non-empty list of {role, content} objects")
        return None
    messages = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            problems.add(origin, f"message {index} needs a string 'content'")
            return None
        if item.get("role") not in ROLES:
            problems.add(origin, f"message {index} has role {item.get('role')!r}; use one of {ROLES}")
            return None
        messages.append(Message(item["role"], item["content"]))
    return tuple(messages)


def alpaca_messages(row: dict[str, Any]) -> tuple[Message, ...]:
    """The chat form of an alpaca row: instruction (+ input as a new paragraph), then output."""
    prompt = row["instruction"].strip()
    if str(row.get("input") or "").strip():
        prompt = f"{prompt}\n\n{str(row['input']).strip()}"
    messages = [Message("user", prompt), Message("assistant", row["output"])]
    if str(row.get("system") or "").strip():
        messages.insert(0, Message("system", str(row["system"])))
    return tuple(messages)


def read_instruction(path: str | Path) -> list[ChatRecord]:
    """Read conversations: JSONL/JSON rows in chat form (`messages`) or alpaca form.

    Raises:
        DataError: rows in neither form, bad roles, conversations without an assistant turn.
    """
    problems, records = Problems(), []
    for origin, row in iter_json_rows(path, problems):
        if "messages" in row:
            messages = parse_messages(row["messages"], origin, problems)
        elif isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
            messages = alpaca_messages(row)
        else:
            problems.add(origin, "missing field: need 'messages' (chat) or 'instruction' + 'output' (alpaca)")
            continue
        if messages is None:
            continue
        if not any(m.role == "assistant" and m.content.strip() for m in messages):
            problems.add(origin, "no non-empty assistant turn to learn from")
            continue
        records.append(ChatRecord(messages, origin))
    problems.raise_if_any()
    return records
