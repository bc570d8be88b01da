"""The API's contract: every request and response body, query and header, defined once.

Handlers validate what they read through these models (``web/inputs.py``) and serialize what
they answer through them (:func:`respond`); ``web/openapi.py`` generates the document's schemas
from them. So the checks, the document and the responses cannot drift apart.

A pydantic ``ValidationError`` becomes the API's error shape (:func:`problems_of`): one
:class:`Problem` per field, with the 0-based ``position`` of each bad entry of a list, in the
house wording ("required", "unknown field", "must be a string").

What a model cannot say is checked where it is said: a recipient list is typed here for the
document, but each entry is checked by ``web/validation.py`` (shared with the form, which has no
JSON), so every bad address is listed with its position and its own reason.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar, get_args

from aiohttp import web
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SkipValidation,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    create_model,
)

from shared.accounts import MAX_TOKEN_NAME_CHARS, InvalidAccount, check_token_name
from shared.batch_names import MAX_NAME_CHARS, name_problem
from shared.composition import BodyFormat
from shared.db import (
    BATCH_STATES,
    MAX_ID,
    RECIPIENT_STATUSES,
    SUPPRESSION_REASONS,
    BatchFilter,
    BatchSummary,
)
from shared.headers import lone_surrogate_message, unsafe_message
from web.captured_mail import KEY_PATTERN

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 100
MAX_SELECTED_IDS = 10_000
MAX_ADDRESSES = 10_000
MAX_ADDRESS_CHARS = 254
MAX_EDITED_SUBJECT_CHARS = 255
MAX_EDITED_BODY_CHARS = 100_000
MAX_SEARCH_CHARS = 200
DEFAULT_MAIL_PAGE_SIZE = 50

RecipientStatus = Literal[
    "queued", "sending", "drafted", "sent", "retrying", "dead", "cancelled", "suppressed"
]
SuppressionReason = Literal["unsubscribed", "hard_bounce", "complaint", "manual"]
BatchStatus = Literal[
    "scheduled",
    "queued",
    "sending",
    "paused",
    "awaiting_review",
    "done",
    "done_with_failures",
    "cancelled",
]
# The database owns these lists; the contract spells them out for the type checker.
assert get_args(RecipientStatus) == RECIPIENT_STATUSES
assert get_args(BatchStatus) == BATCH_STATES
assert get_args(SuppressionReason) == SUPPRESSION_REASONS

# Timestamps leave as ``datetime.isoformat()`` writes them (``+00:00``), as they always have.
Timestamp = Annotated[
    datetime,
    PlainSerializer(datetime.isoformat, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
RowId = Annotated[int, Field(ge=1, le=MAX_ID)]


# -- problems: the 422's details -------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a request, pointing at the field (and entry) at fault.

    ``field`` is ``None`` for the request body as a whole (one that is not a JSON object).
    ``position`` is the 0-based index in a JSON list; ``line`` the 1-based line of a form's
    textarea or CSV file.

    One problem may stand for many entries that fail the same way (a template field missing on
    47 recipients): then ``count`` says how many, ``position`` (or ``line``) is the first of
    them and ``positions`` (or ``lines``) the first few, in order.
    """

    field: str | None
    message: str
    position: int | None = None
    line: int | None = None
    positions: tuple[int, ...] | None = None
    lines: tuple[int, ...] | None = None
    count: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "message": self.message}
        if self.position is not None:
            out["position"] = self.position
        if self.line is not None:
            out["line"] = self.line
        if self.positions is not None:
            out["positions"] = list(self.positions)
        if self.lines is not None:
            out["lines"] = list(self.lines)
        if self.count is not None:
            out["count"] = self.count
        return out

    def sentence(self) -> str:
        """The problem on its own, as a page or an error message shows it."""
        if self.field is None:
            return self.message
        where = self.field if self.position is None else f"{self.field}[{self.position}]"
        return f"{where}: {self.message}"


# pydantic's error types in the API's words; ``{name}`` is filled from the error's context.
_WORDING = {
    "missing": "required",
    "extra_forbidden": "unknown field",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "uuid_type": "must be a UUID",
    "uuid_parsing": "must be a UUID",
    "literal_error": "must be one of: {expected}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must be at least {min_length} character(s)",
    "string_too_long": "must be at most {max_length} characters",
    "string_pattern_mismatch": "must match {pattern}",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "value_error": "{error}",
}


def problems_of(error: ValidationError, model: type[BaseModel]) -> list[Problem]:
    """Each of pydantic's errors as a :class:`Problem`, in the order of the model's fields.

    A model may say, in ``field_expectations``, what one of its fields must be as a whole; that
    sentence then replaces pydantic's for any problem with the field itself (not its entries).
    """
    expectations: dict[str, str] = getattr(model, "field_expectations", {})
    problems = []
    for found in error.errors(include_url=False):
        location = found["loc"]
        field = str(location[0]) if location else None
        position = location[1] if len(location) > 1 and isinstance(location[1], int) else None
        wording = _WORDING.get(found["type"])
        context = {k: str(v) for k, v in (found.get("ctx") or {}).items()}
        message = wording.format(**context) if wording else found["msg"]
        if field in expectations and len(location) == 1 and found["type"] != "extra_forbidden":
            message = expectations[field]
            if found["type"] == "missing":
                message = f"required: {message}"
        problems.append(Problem(field, message, position))
    order = {name: index for index, name in enumerate(model.model_fields)}
    return sorted(problems, key=lambda p: (order.get(p.field or "", -1), p.position or 0))


# -- requests ---------------------------------------------------------------------------------

FieldValue = str | int | float | bool | None


class RecipientObject(BaseModel):
    """A recipient with fields the templates (or the model) may use."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, FieldValue] = Field(init=False)

    email: str


class BatchRequest(BaseModel):
    """``POST /api/batches``. The shape is checked here; each recipient, the templates and the
    schedule by ``web/validation.py``."""

    model_config = ConfigDict(extra="forbid")
    field_expectations: ClassVar[dict[str, str]] = {
        "recipients": "expected a list of addresses or objects",
        "send_at": "must be an ISO 8601 date and time",
    }

    # Entries are passed on as written: validation checks each and names its position.
    recipients: list[SkipValidation[str | RecipientObject]]
    subject: StrictStr | None = Field(None, description="jinja2 template (template drafter)")
    body: StrictStr | None = Field(None, description="jinja2 template (template drafter)")
    drafter: Literal["template", "llm"] = "template"
    context: StrictStr | None = Field(None, description="what the LLM writes from (llm drafter)")
    send: StrictBool = Field(True, description="false: draft, then wait for review")
    send_at: StrictStr | None = Field(
        None,
        description="when to start sending, ISO 8601 with an offset",
        json_schema_extra={"format": "date-time"},
    )
    # How the messages are written (shared.composition); checked by web/validation.py.
    body_format: BodyFormat = Field(
        "text", description="text: the body as written; markdown: CommonMark, sanitized"
    )
    from_name: StrictStr | None = Field(
        None, description="the sender's display name (default: MAILROOM_FROM_NAME)"
    )
    reply_to: StrictStr | None = Field(
        None, description="one address replies go to (default: MAILROOM_REPLY_TO)"
    )
    name: StrictStr | None = Field(
        None,
        description=f"what the batch is called in lists, at most {MAX_NAME_CHARS} characters"
        " on one line (default: the subject, or the start of the context)",
    )


class IdempotencyHeaders(BaseModel):
    """The optional ``Idempotency-Key`` of ``POST /api/batches``."""

    key: Annotated[
        str | None,
        Field(alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[!-~]+$"),
    ] = None


def _edited_subject(value: str) -> str:
    if not value.strip():
        raise ValueError("required")
    if "\r" in value or "\n" in value:
        raise ValueError("must be a single line")
    not_allowed = unsafe_message(value, allow_tab=True)  # NUL included
    if not_allowed is not None:
        raise ValueError(not_allowed)
    return value.strip()


def _edited_body(value: str) -> str:
    if not value.strip():
        raise ValueError("required")
    if "\0" in value:
        raise ValueError("NUL characters are not allowed")
    not_text = lone_surrogate_message(value)
    if not_text is not None:
        raise ValueError(not_text)
    return value


class DraftEdit(BaseModel):
    """``PATCH /api/batches/<id>/recipients/<rid>`` and the draft page: a reviewed draft."""

    model_config = ConfigDict(extra="forbid")

    subject: Annotated[
        StrictStr, Field(max_length=MAX_EDITED_SUBJECT_CHARS), AfterValidator(_edited_subject)
    ]
    body: Annotated[
        StrictStr, Field(max_length=MAX_EDITED_BODY_CHARS), AfterValidator(_edited_body)
    ]


class SelectIds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    field_expectations: ClassVar[dict[str, str]] = {
        "ids": f"must be a list of 1 to {MAX_SELECTED_IDS} recipient ids"
    }

    ids: Annotated[
        list[Annotated[StrictInt, Field(ge=1, le=MAX_ID)]],
        Field(min_length=1, max_length=MAX_SELECTED_IDS),
    ]


class SelectBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_id: uuid.UUID


class SelectAll(BaseModel):
    model_config = ConfigDict(extra="forbid")

    all: Literal[True]


# ``POST /api/dead-letters/redrive`` and ``/discard``: exactly one of the three.
Selection = SelectIds | SelectBatch | SelectAll
SELECTIONS: dict[str, type[SelectIds | SelectBatch | SelectAll]] = {
    "ids": SelectIds,
    "batch_id": SelectBatch,
    "all": SelectAll,
}

# Entries are passed on as written: validation normalizes each and names its position.
Addresses = Annotated[
    list[SkipValidation[Annotated[str, Field(max_length=MAX_ADDRESS_CHARS)]]],
    Field(min_length=1, max_length=MAX_ADDRESSES),
]
_ADDRESSES_EXPECTED = {"addresses": f"must be a list of 1 to {MAX_ADDRESSES} addresses"}


class NewSuppressions(BaseModel):
    """``POST /api/suppressions``."""

    model_config = ConfigDict(extra="forbid")
    field_expectations: ClassVar[dict[str, str]] = _ADDRESSES_EXPECTED

    addresses: Addresses
    reason: SuppressionReason = "manual"


class RemovedSuppressions(BaseModel):
    """``POST /api/suppressions/remove``."""

    model_config = ConfigDict(extra="forbid")
    field_expectations: ClassVar[dict[str, str]] = _ADDRESSES_EXPECTED

    addresses: Addresses


class PageQuery(BaseModel):
    """``?after=&limit=``: keyset paging by id; ``next_after`` of one page is the next's
    ``after``."""

    after: Annotated[int, Field(ge=0, le=MAX_ID)] = 0
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE


class RecipientsQuery(PageQuery):
    status: RecipientStatus | None = None


class DeadLettersQuery(PageQuery):
    batch_id: uuid.UUID | None = None


class DevMessagesQuery(BaseModel):
    """``?q=&offset=&limit=`` of ``GET /api/dev/messages``: the captured messages whose
    recipients or subject contain ``q`` (any case), newest first.

    A Maildir has no ids in order, so this list pages by position: ``next_offset`` of one page
    is the next's ``offset``. A message captured meanwhile moves the rest one place on.
    """

    q: Annotated[str, Field(max_length=MAX_SEARCH_CHARS)] = ""
    offset: Annotated[int, Field(ge=0, le=MAX_ID)] = 0
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_MAIL_PAGE_SIZE


# A batch list's cursor: the created_at (microseconds since 1970, UTC) and id of the last batch
# of the previous page. Readable on purpose: it names a place in the list, nothing secret.
_CURSOR = re.compile(r"^(\d{1,20})_([0-9a-f]{32})$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_BATCH_PAGE_SIZE = 200
DEFAULT_BATCH_PAGE_SIZE = 50
MAX_BATCH_SEARCH_CHARS = MAX_NAME_CHARS


def batch_cursor(summary: BatchSummary) -> str:
    """Where the page after ``summary`` (the last of its page) starts."""
    micros = (summary.created_at - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}_{summary.id.hex}"


def parse_batch_cursor(value: str) -> tuple[datetime, uuid.UUID]:
    """The (created_at, id) a :func:`batch_cursor` names; ValueError for anything else."""
    match = _CURSOR.match(value)
    if match is None:
        raise ValueError("must be a next_cursor from a previous page")
    try:
        at = _EPOCH + timedelta(microseconds=int(match[1]))
    except OverflowError:
        raise ValueError("must be a next_cursor from a previous page") from None
    return at, uuid.UUID(match[2])


def _checked_cursor(value: str) -> str:
    parse_batch_cursor(value)
    return value


def _search(value: str) -> str | None:
    value = value.strip()
    if not value:  # an empty search box searches for nothing
        return None
    problem = name_problem(value)
    if problem is not None:
        raise ValueError(problem.replace("a batch name", "a search"))
    return value


class BatchesQuery(BaseModel):
    """``GET /api/batches?status=&q=&cursor=&limit=``: newest first, keyset-paged; a page's
    ``next_cursor`` is the next page's ``cursor``."""

    status: BatchStatus | None = None
    q: (
        Annotated[
            str,
            Field(max_length=MAX_BATCH_SEARCH_CHARS, description="a piece of the name, any case"),
            AfterValidator(_search),
        ]
        | None
    ) = None
    cursor: (
        Annotated[
            str,
            Field(max_length=64, description="next_cursor of the previous page"),
            AfterValidator(_checked_cursor),
        ]
        | None
    ) = None
    limit: Annotated[int, Field(ge=1, le=MAX_BATCH_PAGE_SIZE)] = DEFAULT_BATCH_PAGE_SIZE

    def filter(self) -> BatchFilter:
        before = parse_batch_cursor(self.cursor) if self.cursor else None
        return BatchFilter(status=self.status, name_contains=self.q or None, before=before)


class AuditQuery(PageQuery):
    """``GET /api/audit?after=&limit=``: newest first; a page's ``next_after`` is the next
    (older) page's ``after``."""


def _token_name(value: str) -> str:
    try:
        return check_token_name(value)
    except InvalidAccount as exc:
        raise ValueError(str(exc)) from None


class TokensQuery(BaseModel):
    """``GET /api/tokens?all=``: the caller's own tokens, or (an admin, ``all=true``)
    everyone's."""

    all: bool = False


class NewToken(BaseModel):
    """``POST /api/tokens``: ``{"name": "what it is for"}``."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[
        StrictStr,
        Field(min_length=1, max_length=MAX_TOKEN_NAME_CHARS),
        AfterValidator(_token_name),
    ]


class PathIds(BaseModel):
    """What the ids in the API's paths are (the document's path parameters)."""

    batch_id: uuid.UUID
    recipient_id: int
    token_id: Annotated[int, Field(ge=1, le=MAX_ID)]
    key: Annotated[str, Field(pattern=KEY_PATTERN, description="a captured message's file name")]


# -- responses --------------------------------------------------------------------------------


def respond(body: BaseModel, *, status: int = 200) -> web.Response:
    """``body`` serialized through its model, as JSON."""
    return web.json_response(body.model_dump(mode="json"), status=status)


class Created(BaseModel):
    id: uuid.UUID
    total: int
    duplicates_removed: int
    status_url: str

    @classmethod
    def of(cls, batch_id: uuid.UUID, total: int, duplicates_removed: int) -> Self:
        return cls(
            id=batch_id,
            total=total,
            duplicates_removed=duplicates_removed,
            status_url=f"/api/batches/{batch_id}",
        )


class Counts(BaseModel):
    """How many of a batch's recipients are in each status."""

    queued: int
    sending: int
    drafted: int
    sent: int
    retrying: int
    dead: int
    cancelled: int
    suppressed: int


assert tuple(Counts.model_fields) == RECIPIENT_STATUSES


class Tokens(BaseModel):
    prompt: int
    completion: int


class Progress(BaseModel):
    """Two shares, 0.0 to 1.0: ``delivered`` counts only what the SMTP server accepted;
    ``finished`` every recipient in a final state (sent, dead, cancelled or suppressed)."""

    delivered: Annotated[float, Field(ge=0, le=1)]
    finished: Annotated[float, Field(ge=0, le=1)]


class Batch(BaseModel):
    id: uuid.UUID
    name: str
    subject: str = Field(description="the subject template (empty for the llm drafter)")
    status: BatchStatus
    total: int
    counts: Counts
    progress: Progress
    drafter: str
    review: bool
    approved: bool
    tokens: Tokens
    send_at: Timestamp | None
    paused_until: Timestamp | None = Field(
        description="paused: when the full sending-rate window ends"
    )
    cancelled_at: Timestamp | None
    created_at: Timestamp
    body_format: BodyFormat
    from_name: str | None = Field(description="null: MAILROOM_FROM_NAME, if set")
    reply_to: str | None = Field(description="null: MAILROOM_REPLY_TO, if set")

    @classmethod
    def of(cls, summary: BatchSummary) -> Self:
        return cls(
            id=summary.id,
            name=summary.name,
            subject=summary.subject_template,
            status=summary.status,  # type: ignore[arg-type]
            total=summary.total,
            counts=Counts.model_validate(summary.counts),
            progress=Progress(
                delivered=round(summary.delivered, 4), finished=round(summary.finished, 4)
            ),
            drafter=summary.drafter,
            review=summary.review,
            approved=summary.approved,
            tokens=Tokens(prompt=summary.prompt_tokens, completion=summary.completion_tokens),
            send_at=summary.send_at,
            paused_until=summary.paused_until,
            cancelled_at=summary.cancelled_at,
            created_at=summary.created_at,
            body_format=summary.body_format,  # type: ignore[arg-type]
            from_name=summary.from_name,
            reply_to=summary.reply_to,
        )


class BatchList(BaseModel):
    """``GET /api/batches``: a page of batches, newest first; ``next_cursor`` is null on the
    last page."""

    batches: list[Batch]
    next_cursor: str | None

    @classmethod
    def of(cls, summaries: list[BatchSummary], limit: int) -> Self:
        """A page of ``summaries``; a full page has a cursor, since more may follow."""
        more = len(summaries) == limit and summaries
        return cls(
            batches=[Batch.of(s) for s in summaries],
            next_cursor=batch_cursor(summaries[-1]) if more else None,
        )


class Recipient(BaseModel):
    id: int
    email: str
    status: RecipientStatus
    attempts: int
    last_error: str | None
    message_id: str | None
    sent_at: Timestamp | None


class DeadLetter(BaseModel):
    id: int
    batch_id: uuid.UUID
    email: str
    attempts: int
    last_error: str | None
    died_at: Timestamp


class Suppression(BaseModel):
    id: int
    address: str
    reason: SuppressionReason
    detail: str | None
    created_at: Timestamp


Item = TypeVar("Item", bound=BaseModel)


class Page(BaseModel):
    """The one paged-list envelope: ``{<items>: [...], "next_after": id | null}``.

    Each list names its items (``recipients``, ``dead_letters``, ``suppressions``), so a page
    model is made per list by :func:`page_of`.
    """

    items_field: ClassVar[str]

    @classmethod
    def of(cls, rows: list[dict[str, Any]], limit: int) -> Self:
        """A page of ``rows``; a full page has a cursor, since more rows may follow."""
        next_after = rows[-1]["id"] if len(rows) == limit else None
        return cls.model_validate({cls.items_field: rows, "next_after": next_after})


def page_of(items_field: str, item: type[Item]) -> type[Page]:
    """The page model of ``item``s listed under ``items_field``."""
    model: type[Page] = create_model(  # type: ignore[call-overload]
        f"{item.__name__}Page",
        __base__=Page,
        **{items_field: (list[item], ...), "next_after": (int | None, ...)},  # type: ignore[valid-type]
    )
    model.items_field = items_field
    return model


class AuditEntry(BaseModel):
    """Who did what, and when: ``actor`` is a user's name, ``api-token`` for
    ``MAILROOM_API_TOKEN`` or ``cli`` for the command line."""

    id: int
    at: datetime
    actor: str
    action: str
    batch_id: uuid.UUID | None
    recipient_ids: list[int] | None
    count: int | None
    subject: str | None
    detail: dict[str, Any]


class TokenInfo(BaseModel):
    """A personal API token as listed: never the token itself."""

    id: int
    name: str
    user_name: str
    created_at: datetime
    revoked_at: datetime | None


class TokenList(BaseModel):
    tokens: list[TokenInfo]


class TokenCreated(TokenInfo):
    """The new token; ``token`` is shown this once and never again (only its hash is kept)."""

    token: str


class TokenRevoked(BaseModel):
    id: int
    revoked: bool


RecipientPage = page_of("recipients", Recipient)
AuditEntryPage = page_of("entries", AuditEntry)
DeadLetterPage = page_of("dead_letters", DeadLetter)
SuppressionPage = page_of("suppressions", Suppression)


class Cancelled(BaseModel):
    id: uuid.UUID
    cancelled: int


class Approved(BaseModel):
    id: uuid.UUID
    queued: int


class DraftSaved(BaseModel):
    id: int
    subject: str


class Redriven(BaseModel):
    redriven: int


class Discarded(BaseModel):
    discarded: int


class SuppressionsAdded(BaseModel):
    added: int
    already_suppressed: int


class SuppressionsRemoved(BaseModel):
    removed: int


class CapturedMessage(BaseModel):
    """A captured message's summary; ``key`` is ``None`` for a file whose name cannot be part
    of a path (it is listed, but cannot be fetched)."""

    key: str | None
    message_id: str
    to: list[str]
    subject: str
    received_at: Timestamp


class CapturedMessages(BaseModel):
    """One page of ``GET /api/dev/messages``; ``total`` counts every match (among the newest
    20,000 messages when searching), ``next_offset`` is ``None`` on the last page."""

    messages: list[CapturedMessage]
    total: int
    offset: int
    limit: int
    next_offset: int | None


class CapturedHeader(BaseModel):
    name: str
    value: str


class CapturedMessageView(CapturedMessage):
    """A captured message decoded for reading. ``text`` and ``html`` are the parts as the
    sender wrote them (``None`` when absent): the HTML is a sender's markup, never safe to
    render as is. ``links`` are the http, https and mailto links of the parts and of
    ``List-Unsubscribe``."""

    headers: list[CapturedHeader]
    text: str | None
    html: str | None
    links: list[str]
    attachments: list[str]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    reason: str | None = None
    pending: list[str] | None = None


class ProblemDetails(BaseModel):
    problems: list[Problem]
    total_problems: int | None = None


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: ProblemDetails | None


class ErrorBody(BaseModel):
    """Every error the API answers: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorInfo
