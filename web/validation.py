"""Validating a batch submission before anything is written.

Both the JSON API and the HTML form end here. Every problem is collected (not just the first)
so an operator who pasted 2,000 addresses sees every bad one at once, by position: 0-based
``position`` for the API's list, 1-based ``line`` for the form's textarea.
"""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from shared.addresses import InvalidAddress, dedupe_key, normalize_address
from shared.batch_names import name_problem
from shared.composition import BODY_FORMATS, Composition, checked_reply_to, from_name_problem
from shared.db import NewBatch, NewRecipient
from shared.headers import lone_surrogate_message, unsafe_message
from shared.templating import (
    TemplateProblem,
    TemplateTooExpensive,
    fields_used,
    render,
    template_values,
)
from web.contract import BatchRequest, Problem, problems_of

DRAFTERS = ("template", "llm")
MAX_CONTEXT_CHARS = 20_000
MAX_SUBJECT_TEMPLATE_CHARS = 998
MAX_BODY_TEMPLATE_CHARS = 100_000
MAX_FIELDS_PER_RECIPIENT = 50
MAX_FIELD_VALUE_CHARS = 2_000
MAX_PROBLEMS_LISTED = 1_000
# Entries that fail the same way are one problem: its count, and the first few positions.
FIRST_POSITIONS_LISTED = 5
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
MAX_SCHEDULE_AHEAD = timedelta(days=365)
# The dry run renders each distinct set of recipient fields (each render on the templates'
# own budget, shared.templating.RENDER_SECONDS); all of them together get this long.
DRY_RUN_SECONDS = 2.0


class InvalidSubmission(Exception):
    """The submission was refused; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem], total: int | None = None) -> None:
        super().__init__(f"{len(problems)} problem(s) in the submission")
        # Whole-field problems first, then entries in the order the operator wrote them.
        ordered = sorted(
            problems,
            key=lambda p: (p.position is not None or p.line is not None, p.position or p.line or 0),
        )
        self.problems = ordered[:MAX_PROBLEMS_LISTED]
        self.total = total if total is not None else len(problems)


@dataclass(frozen=True)
class Sources:
    """Where a form's recipients came from, when both the textarea and a CSV gave some."""

    pasted: int  # addresses pasted
    csv: int  # rows of the CSV
    duplicates_across: int  # addresses given in both (counted in ``duplicates_removed`` too)


@dataclass
class Submission:
    """A validated batch, ready for :meth:`shared.db.Database.create_batch`."""

    recipients: list[NewRecipient]
    subject: str
    body: str
    drafter: str = "template"
    duplicates_removed: int = 0
    sources: Sources | None = None
    context: str | None = None
    review: bool = False
    send_at: datetime | None = None
    composition: Composition = field(default_factory=Composition)
    name: str | None = None  # None: shared.db makes one from the subject or the context

    def to_new_batch(self, *, created_by: str, request_id: str | None) -> NewBatch:
        return NewBatch(
            created_by=created_by,
            request_id=request_id,
            drafter=self.drafter,
            subject_template=self.subject,
            body_template=self.body,
            recipients=self.recipients,
            context=self.context,
            review=self.review,
            send_at=self.send_at,
            composition=self.composition,
            name=self.name,
        )


@dataclass(frozen=True)
class Limits:
    """What the server allows: batch size, and whether it can draft with an LLM."""

    max_batch_size: int
    llm_available: bool = False


@dataclass
class _Entry:
    """A raw recipient with where it came from (for error messages)."""

    raw: Any
    position: int | None = None
    line: int | None = None
    source: str = "recipients"  # the form field it came from: "recipients" or "csv"


def from_json(payload: Any, *, limits: Limits) -> Submission:
    """Validate the API's JSON body (:class:`web.contract.BatchRequest`): ``recipients``, then
    ``subject`` and ``body`` templates (``drafter: "template"``, the default) or a ``context``
    (``drafter: "llm"``), and ``send: false`` to stop after drafting for review.

    A body of the wrong shape (an unknown field, a wrong type) is refused for that alone; once
    the shape is right, every problem with the recipients and templates is listed.
    """
    if not isinstance(payload, dict):
        raise InvalidSubmission([Problem(None, "the body must be a JSON object")])
    try:
        batch = BatchRequest.model_validate(payload)
    except ValidationError as exc:
        raise InvalidSubmission(problems_of(exc, BatchRequest)) from None
    entries = [_Entry(raw=item, position=i) for i, item in enumerate(batch.recipients)]
    problems: list[Problem] = []
    send_at = _send_at(batch.send_at, problems, naive_is_utc=False)
    composition = _composition(batch.body_format, batch.from_name, batch.reply_to, problems)

    name = _name(batch.name, problems)
    submission = _validate(
        entries,
        subject=batch.subject,
        body=batch.body,
        drafter=batch.drafter,
        context=batch.context,
        review=not batch.send,
        send_at=send_at,
        problems=problems,
        limits=limits,
    )
    return replace(submission, composition=composition, name=name)


def from_form(form: dict[str, str], *, limits: Limits, csv_text: str | None = None) -> Submission:
    """Validate the HTML form: one address per line (commas and semicolons also separate),
    and/or a CSV file whose header row names an ``email`` column (other columns are fields)."""
    entries: list[_Entry] = []
    for number, text in enumerate(_lines(form.get("recipients", "")), start=1):
        for piece in re.split(r"[,;]", text):
            if piece.strip():
                entries.append(_Entry(raw=piece.strip(), line=number))
    problems: list[Problem] = []
    if csv_text is not None:
        entries += _csv_entries(csv_text, problems)
    send_at = _send_at(form.get("send_at") or None, problems, naive_is_utc=True)
    composition = _composition(
        form.get("body_format") or "text", form.get("from_name"), form.get("reply_to"), problems
    )

    name = _name(form.get("name"), problems)
    submission = _validate(
        entries,
        subject=form.get("subject"),
        body=form.get("body"),
        drafter=form.get("drafter") or "template",
        context=form.get("context"),
        review=form.get("review") in {"1", "on", "true"},
        send_at=send_at,
        problems=problems,
        limits=limits,
    )
    return replace(submission, composition=composition, name=name)


def _composition(
    body_format: Any, from_name: Any, reply_to: Any, problems: list[Problem]
) -> Composition:
    """The batch's body format, sender name and Reply-To (``shared.composition``); a blank
    name or Reply-To is none (the settings' then). Only spaces are trimmed: a line break or
    another control character at either end is refused like one inside. Problems name
    ``body_format``, ``from_name`` or ``reply_to``."""
    if body_format not in BODY_FORMATS:
        problems.append(Problem("body_format", f"must be one of: {', '.join(BODY_FORMATS)}"))
    name = from_name.strip(" ") if isinstance(from_name, str) else None
    if name and (problem := from_name_problem(name)) is not None:
        problems.append(Problem("from_name", problem))
    address = reply_to.strip(" ") if isinstance(reply_to, str) else None
    if address:
        try:
            address = checked_reply_to(address)
        except InvalidAddress as exc:
            problems.append(Problem("reply_to", f"must be one email address: {exc}"))
    return Composition(
        body_format=str(body_format), from_name=name or None, reply_to=address or None
    )


def _name(value: str | None, problems: list[Problem]) -> str | None:
    """A given batch name, trimmed (``None`` when not given or blank: one is made up)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    problem = name_problem(value)
    if problem is not None:
        problems.append(Problem("name", problem))
        return None
    return value


def addresses_from_form(text: str, csv_text: str | None = None) -> list[str]:
    """Addresses pasted one per line (commas and semicolons also separate) and/or a CSV's
    ``email`` column, normalized; :class:`InvalidSubmission` lists every bad one by line."""
    entries = [
        _Entry(raw=piece.strip(), line=number)
        for number, line in enumerate(_lines(text), start=1)
        for piece in re.split(r"[,;]", line)
        if piece.strip()
    ]
    problems: list[Problem] = []
    if csv_text is not None:
        entries += [
            _Entry(raw=e.raw["email"], line=e.line, source="csv")
            for e in _csv_entries(csv_text, problems)
        ]
    if not entries and not problems:
        problems.append(Problem("recipients", "give at least one address"))
    return _normalized(entries, problems)


def _lines(text: str) -> list[str]:
    """The lines of a textarea as the browser shows them: broken at CR and LF only (not at the
    form feeds, separators and NELs ``str.splitlines()`` also breaks at), so line numbers in
    errors match what the operator sees."""
    return _LINE_BREAK.split(text)


def addresses_from_list(given: list[Any]) -> list[str]:
    """A JSON list of addresses, normalized; :class:`InvalidSubmission` lists every bad one
    by its 0-based position."""
    return _normalized([_Entry(raw=a, position=i, source="addresses") for i, a in enumerate(given)])


def _normalized(entries: list[_Entry], problems: list[Problem] | None = None) -> list[str]:
    """Each entry as a normalized address, or :class:`InvalidSubmission` with every problem
    (those given, then one per bad entry)."""
    problems = problems if problems is not None else []
    addresses = []
    for entry in entries:
        if not isinstance(entry.raw, str):
            problems.append(
                Problem(entry.source, "expected an address string", entry.position, entry.line)
            )
            continue
        try:
            addresses.append(normalize_address(entry.raw))
        except InvalidAddress as exc:
            message = f"{_shown(entry.raw)}: {exc}"
            problems.append(Problem(entry.source, message, entry.position, entry.line))
    if problems:
        raise InvalidSubmission(problems)
    return addresses


def _csv_entries(text: str, problems: list[Problem]) -> list[_Entry]:
    """Rows of an uploaded CSV as entries; ``line`` is the row's line in the file."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        problems.append(Problem("csv", "the file is empty"))
        return []
    except csv.Error as exc:
        problems.append(Problem("csv", f"line 1: not readable as CSV ({exc})", line=1))
        return []
    lowered = [name.lower() for name in header]
    if "email" not in lowered:
        problems.append(Problem("csv", 'the header row needs an "email" column', line=1))
        return []
    email_at = lowered.index("email")
    bad = [n for i, n in enumerate(header) if i != email_at and not _FIELD_NAME.match(n)]
    if bad or len(set(lowered)) != len(lowered):
        what = (
            f"column names must be letters, digits and _ : {', '.join(map(repr, bad))}"
            if bad
            else "column names repeat"
        )
        problems.append(Problem("csv", f"line 1: {what}", line=1))
        return []
    entries = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                problems.append(
                    Problem(
                        "csv", f"{len(row)} values for {len(header)} columns", line=reader.line_num
                    )
                )
                continue
            fields = {name: row[i] for i, name in enumerate(header) if i != email_at}
            entries.append(
                _Entry(raw={"email": row[email_at], **fields}, line=reader.line_num, source="csv")
            )
    except csv.Error as exc:
        problems.append(Problem("csv", f"not readable as CSV ({exc})", line=reader.line_num))
    return entries


def _validate(
    entries: list[_Entry],
    *,
    subject: Any,
    body: Any,
    drafter: Any,
    context: Any,
    review: bool,
    send_at: datetime | None,
    problems: list[Problem],
    limits: Limits,
) -> Submission:
    max_batch_size = limits.max_batch_size
    templates_ok = False
    subject_fields: set[str] = set()
    if drafter == "llm":
        context = _check_llm(subject, body, context, limits, problems)
        subject = body = ""
    elif drafter in DRAFTERS:
        if context not in (None, ""):
            problems.append(Problem("context", 'only used with "drafter": "llm"'))
        context = None
        templates_ok = _check_template(
            "subject", subject, MAX_SUBJECT_TEMPLATE_CHARS, problems, single_line=True
        )
        if templates_ok:
            subject_fields = fields_used(str(subject))
        templates_ok &= _check_template("body", body, MAX_BODY_TEMPLATE_CHARS, problems)
    else:
        problems.append(Problem("drafter", f"must be one of: {', '.join(DRAFTERS)}"))

    if not entries and not any(p.field in {"recipients", "csv"} for p in problems):
        problems.append(Problem("recipients", "at least one recipient is required"))
    if len(entries) > max_batch_size:
        problems.append(
            Problem("recipients", f"{len(entries)} recipients; at most {max_batch_size} per batch")
        )
        raise InvalidSubmission(problems)

    recipients: list[NewRecipient] = []
    kept: list[_Entry] = []
    seen: dict[str, str] = {}  # dedupe key: the source that gave it first
    duplicates = across = 0
    for entry in entries:
        recipient = _recipient(entry, problems, subject_fields)
        if recipient is None:
            continue
        key = dedupe_key(recipient.email)
        if key in seen:
            duplicates += 1
            across += seen[key] != entry.source
            continue
        seen[key] = entry.source
        recipients.append(recipient)
        kept.append(entry)
    given = {source: sum(e.source == source for e in entries) for source in ("recipients", "csv")}
    sources = Sources(given["recipients"], given["csv"], across) if all(given.values()) else None
    if templates_ok:
        before = len(problems)
        _dry_run(str(subject), str(body), recipients, kept, problems)
        if len(problems) == before:  # the templates render: check what each subject becomes
            _check_rendered_subjects(str(subject), subject_fields, recipients, kept, problems)

    if problems:
        raise InvalidSubmission(problems)
    assert isinstance(subject, str) and isinstance(body, str)
    return Submission(
        recipients=recipients,
        subject=subject,
        body=body,
        drafter=drafter,
        duplicates_removed=duplicates,
        sources=sources,
        context=context,
        review=review,
        send_at=send_at,
    )


def _send_at(value: Any, problems: list[Problem], *, naive_is_utc: bool) -> datetime | None:
    """When to start sending: an ISO 8601 time (the API needs its offset; the form is UTC)."""
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(Problem("send_at", "must be an ISO 8601 date and time"))
        return None
    now = datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        # The example is always one the server would take: a month from now.
        example = f"{now + timedelta(days=30):%Y-%m-%d}T09:00:00Z"
        problems.append(Problem("send_at", f"must be an ISO 8601 date and time, e.g. {example}"))
        return None
    if moment.tzinfo is None:
        if not naive_is_utc:
            problems.append(Problem("send_at", "needs a time zone offset, e.g. Z or +01:00"))
            return None
        moment = moment.replace(tzinfo=UTC)
    if moment < now - timedelta(minutes=1):
        problems.append(Problem("send_at", "in the past"))
    elif moment > now + MAX_SCHEDULE_AHEAD:
        problems.append(
            Problem("send_at", f"more than a year ahead (at most {MAX_SCHEDULE_AHEAD.days} days)")
        )
    return moment


def _check_llm(
    subject: Any, body: Any, context: Any, limits: Limits, problems: list[Problem]
) -> str | None:
    if not limits.llm_available:
        problems.append(
            Problem("drafter", "the llm drafter is not configured: set MAILROOM_GROQ_API_KEY")
        )
    for name, value in (("subject", subject), ("body", body)):
        if value not in (None, ""):
            problems.append(
                Problem(
                    name,
                    'not used with "drafter": "llm" (the model writes it; guide it '
                    "through the context)",
                )
            )
    if not isinstance(context, str) or not context.strip():
        problems.append(Problem("context", 'required with "drafter": "llm"'))
        return None
    if len(context) > MAX_CONTEXT_CHARS:
        problems.append(Problem("context", f"longer than {MAX_CONTEXT_CHARS} characters"))
        return None
    if "\0" in context:
        problems.append(Problem("context", "NUL characters are not allowed"))
        return None
    not_text = lone_surrogate_message(context)
    if not_text is not None:
        problems.append(Problem("context", not_text))
        return None
    return context


def _check_template(
    name: str, value: Any, max_chars: int, problems: list[Problem], *, single_line: bool = False
) -> bool:
    if not isinstance(value, str) or not value.strip():
        problems.append(Problem(name, "required"))
        return False
    if len(value) > max_chars:
        problems.append(Problem(name, f"longer than {max_chars} characters"))
        return False
    if single_line and ("\r" in value or "\n" in value):
        problems.append(Problem(name, "must be a single line"))
        return False
    # A single line is a subject: it goes into a header (a tab may stay). Any other template
    # only has to be storable text.
    if single_line:
        not_allowed = unsafe_message(value, allow_tab=True)
    elif "\0" in value:
        not_allowed = "NUL characters are not allowed"
    else:
        not_allowed = lone_surrogate_message(value)
    if not_allowed is not None:
        problems.append(Problem(name, not_allowed))
        return False
    try:
        fields_used(value)
    except TemplateTooExpensive as exc:
        problems.append(Problem(name, str(exc)))
        return False
    except TemplateProblem as exc:
        problems.append(Problem(name, f"template error: {exc}"))
        return False
    return True


def _dry_run(
    subject: str,
    body: str,
    recipients: list[NewRecipient],
    entries: list[_Entry],
    problems: list[Problem],
) -> None:
    """Render both templates once per distinct set of recipient fields.

    Recipients with the same fields fail the same way (a field the template needs and does not
    default), so one render per shape catches them all without rendering every recipient.

    Each render runs on the templates' budget, and the whole dry run must end within
    ``DRY_RUN_SECONDS``: a template too expensive to render is refused on its own field, and
    the dry run stops there (callers run it off the event loop).
    """
    deadline = time.monotonic() + DRY_RUN_SECONDS
    spent = {"subject": 0.0, "body": 0.0}  # which template the dry run's time goes to
    shapes: dict[frozenset[str], list[int]] = {}
    for index, recipient in enumerate(recipients):
        shapes.setdefault(frozenset(recipient.fields), []).append(index)
    # Recipients that fail the same way, by where they came from, template and reason: one
    # problem each, however many shapes (and recipients) share it.
    failing: dict[tuple[str, str], list[int]] = {}
    _render_shapes(subject, body, recipients, shapes, failing, spent, deadline, problems)
    for (name, reason), members in failing.items():
        by_source: dict[str, list[int]] = {}
        for index in members:
            by_source.setdefault(entries[index].source, []).append(index)
        for indexes in by_source.values():
            problems.append(_failing(name, reason, indexes, recipients, entries))


def _render_shapes(
    subject: str,
    body: str,
    recipients: list[NewRecipient],
    shapes: dict[frozenset[str], list[int]],
    failing: dict[tuple[str, str], list[int]],
    spent: dict[str, float],
    deadline: float,
    problems: list[Problem],
) -> None:
    """:func:`_dry_run`'s renders; adds the recipients that fail to ``failing``."""
    for members in shapes.values():
        sample = recipients[members[0]]
        values = template_values(sample.fields, sample.email)
        for name, source in (("subject", subject), ("body", body)):
            started = time.monotonic()
            failure: TemplateProblem | None = None
            try:
                render(source, values, deadline=deadline)
            except TemplateProblem as exc:
                failure = exc
            spent[name] += time.monotonic() - started
            if isinstance(failure, TemplateTooExpensive):
                if time.monotonic() >= deadline:
                    reason = (
                        f"rendering it for {len(shapes)} different sets of recipient fields "
                        f"took longer than {DRY_RUN_SECONDS:g} s"
                    )
                    slowest = max(spent, key=lambda n: spent[n])
                    problems.append(Problem(slowest, str(TemplateTooExpensive(reason))))
                else:
                    message = f"{failure} (with the fields of {sample.email})"
                    problems.append(Problem(name, message))
                return
            if failure is not None:
                failing.setdefault((name, str(failure)), []).extend(members)
                break


def _failing(
    name: str,
    reason: str,
    members: list[int],
    recipients: list[NewRecipient],
    entries: list[_Entry],
) -> Problem:
    """One problem for every recipient a template fails on the same way, with the count and
    the first few positions (or lines)."""
    members = sorted(members)
    first = entries[members[0]]
    count = len(members)
    who = recipients[members[0]].email
    if count > 1:
        who = f"{count} recipients (the first {who})"
    listed = [entries[i] for i in members[:FIRST_POSITIONS_LISTED]]
    positions = tuple(e.position for e in listed if e.position is not None)
    lines = tuple(e.line for e in listed if e.line is not None)
    return Problem(
        first.source,
        f"{who}: the {name} template fails: {reason}",
        position=first.position,
        line=first.line,
        positions=positions if count > 1 and positions else None,
        lines=lines if count > 1 and lines else None,
        count=count if count > 1 else None,
    )


def _check_rendered_subjects(
    subject: str,
    subject_fields: set[str],
    recipients: list[NewRecipient],
    entries: list[_Entry],
    problems: list[Problem],
) -> None:
    """Render the subject for every recipient and refuse one that cannot go into a header.

    The recipients' own text was checked already; this catches what the template makes of
    values (``{{ '%c' % n }}``, an escape in a string literal, a filter). The subject differs
    only as the fields it reads differ, so it is rendered once per distinct set of their
    values. A template that fails to render is :func:`_dry_run`'s to report. All the renders
    together get ``DRY_RUN_SECONDS`` too, so a subject whose cost grows with each recipient's
    values (a loop over a field) cannot hold a request for the size of the batch.
    """
    deadline = time.monotonic() + DRY_RUN_SECONDS
    seen: dict[tuple[tuple[Any, ...], ...], str | None] = {}
    for index, recipient in enumerate(recipients):
        values = template_values(recipient.fields, recipient.email)
        key = tuple(
            (name, type(values.get(name)), values.get(name)) if name in values else (name,)
            for name in sorted(subject_fields)
        )
        if key not in seen:
            try:
                seen[key] = unsafe_message(
                    render(subject, values, deadline=deadline), allow_tab=True
                )
            except TemplateTooExpensive:
                if time.monotonic() >= deadline:
                    reason = (
                        f"rendering it for each of {len(recipients)} recipients took longer"
                        f" than {DRY_RUN_SECONDS:g} s"
                    )
                    problems.append(Problem("subject", str(TemplateTooExpensive(reason))))
                    return
                seen[key] = None  # this recipient's own render: the worker makes it a dead letter
            except TemplateProblem:
                seen[key] = None
        not_allowed = seen[key]
        if not_allowed is not None:
            entry = entries[index]
            problems.append(
                Problem(
                    entry.source,
                    f"{recipient.email}: the rendered subject: {not_allowed}",
                    position=entry.position,
                    line=entry.line,
                )
            )


def _recipient(
    entry: _Entry, problems: list[Problem], subject_fields: set[str]
) -> NewRecipient | None:
    def problem(message: str) -> None:
        problems.append(Problem(entry.source, message, position=entry.position, line=entry.line))

    raw = entry.raw
    fields: dict[str, Any] = {}
    if isinstance(raw, dict):
        address = raw.get("email")
        fields = {k: v for k, v in raw.items() if k != "email"}
    else:
        address = raw
    if not isinstance(address, str):
        problem('expected an address string or an object with an "email" string')
        return None
    try:
        email = normalize_address(address)
    except InvalidAddress as exc:
        problem(f"{_shown(address)}: {exc}")
        return None
    bad_fields = _field_problems(fields, subject_fields)
    if bad_fields:
        problem(f"{email}: {bad_fields}")
        return None
    return NewRecipient(email=email, fields=fields)


def _field_problems(fields: dict[str, Any], subject_fields: set[str]) -> str | None:
    """What is wrong with a recipient's fields, if anything. A field the subject template reads
    goes into a header and is held to :mod:`shared.headers`' rule (a tab may stay); any other
    field only reaches the body or the model, and only has to be storable text."""
    if len(fields) > MAX_FIELDS_PER_RECIPIENT:
        return f"more than {MAX_FIELDS_PER_RECIPIENT} fields"
    for name, value in fields.items():
        if not _FIELD_NAME.match(name):
            return f"field name {name!r} must be letters, digits and _ (not starting with a digit)"
        if value is not None and not isinstance(value, str | int | float | bool):
            return f"field {name!r} must be a string, number, boolean or null"
        if isinstance(value, str) and len(value) > MAX_FIELD_VALUE_CHARS:
            return f"field {name!r} longer than {MAX_FIELD_VALUE_CHARS} characters"
        if not isinstance(value, str):
            continue
        not_allowed = unsafe_message(value, allow_tab=True) if name in subject_fields else None
        if not_allowed is not None:
            return f"field {name!r}: {not_allowed} (the subject uses this field)"
        if "\0" in value:
            return f"field {name!r} contains a NUL character"
        not_text = lone_surrogate_message(value)
        if not_text is not None:
            return f"field {name!r}: {not_text}"
    return None


def _shown(text: str) -> str:
    """A bad address as it may be echoed back: quoted, control characters made visible."""
    return repr(text[:80] + ("…" if len(text) > 80 else ""))
