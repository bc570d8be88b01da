"""User-supplied templates: a sandboxed jinja2 environment shared by validation and rendering.

Templates come from whoever submits a batch, so they run in jinja2's immutable sandbox with
``StrictUndefined`` (a missing field is an error, not an empty string), and every render runs
on a budget: a template that would spend seconds of CPU or gigabytes of memory is stopped with
:class:`TemplateTooExpensive` instead.

How a runaway render is stopped. A thread cannot be killed in CPython, so the budget is
cooperative: the render itself checks it, at *checkpoints*, and raises once it is spent. The
code generator and the sandbox put a checkpoint

- on every item of every ``{% for %}`` loop (the iterable is wrapped; recursive loops'
  ``loop(...)`` calls too), which counts toward ``MAX_STEPS`` and checks the deadline;
- on every call (macros, ``caller()``, methods, ``range``, ``lipsum``, ``dict``, ``namespace``
  …), which also counts toward ``MAX_STEPS`` and ``MAX_CALLS`` and bounds how deep calls nest
  (``MAX_CALL_DEPTH``: a recursive macro);
- on every filter application (also inside ``map``/``select``), and on every output chunk the
  render streams out (``Template.generate``: the output cap is enforced as the text comes, not
  after).

Between two checkpoints a render runs straight-line code of a template limited to
``MAX_TEMPLATE_NODES`` nodes, each bounded in what it can build: every operator (``+ * %
**``), ``~``, slice, filter and method call checks the size of what it would make *before*
making it where the size depends on an argument (``center``/``ljust``/``rjust``/``zfill``
widths, ``indent``, ``wordwrap``, ``truncate``, ``format`` and ``%`` widths and precisions,
``str.format`` fields, ``replace``, ``join``, ``expandtabs``, ``translate``, repetition
counts, ``range`` sizes, ``batch``/``slice`` counts, integer sizes), and every result counts
toward ``MAX_PRODUCED`` — so memory stays near a few megabytes however the template loops, and
the deadline is checked again within microseconds to milliseconds. Loops over long strings or
lists from a recipient's fields are covered the same way: each item is a step.

What is not covered: one operation between two checkpoints runs to its end. On values that are
already bounded that is microseconds to milliseconds, at worst a few tens of them (sorting or
comparing lists of many long strings, ``textwrap`` or a regex over a 100,000-character string);
the pure-Python ones let the event loop's thread in meanwhile, a C-level one holds the GIL until
it returns. Parsing and compiling a template is not interruptible either: it is bounded by
``MAX_TEMPLATE_TAGS`` and ``MAX_TEMPLATE_NODES`` (Python's ``compile()`` of the largest
template allowed holds the GIL for about 50 ms) and done once per template (cached).

Renders that may be expensive run off the event loop (:func:`in_render_thread`), so a render
that uses its whole budget costs its own request or job that time, not everyone's.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import re
import threading
import time
import types
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from string import Formatter
from typing import Any, NoReturn, ParamSpec, TypeVar, cast

import jinja2
from jinja2 import meta, nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError
from jinja2.filters import FILTERS, make_attrgetter
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace, _PassArg, generate_lorem_ipsum, pass_environment
from markupsafe import EscapeFormatter, Markup

MAX_RENDERED_CHARS = 100_000
# Any one string (or list, counted in items) a template builds; an intermediate value longer
# than the whole rendered text could never be output anyway.
MAX_VALUE_CHARS = MAX_RENDERED_CHARS
# Everything a render builds, added up: strings, lists, text written into macro and
# ``{% set %}`` buffers. It bounds the memory a render can hold at once.
MAX_PRODUCED = 20 * MAX_RENDERED_CHARS
# Loop iterations, calls and filter applications in one render.
MAX_STEPS = 100_000
# Calls among them (macros, methods, globals): the costliest steps, several microseconds and a
# handful of objects each, so a runaway recursion stops within a tenth of a second.
MAX_CALLS = 10_000
MAX_RANGE = 10_000
MAX_CALL_DEPTH = 50
MAX_EXPONENT = 100
MAX_INT_BITS = 16_384  # about 4,900 digits: Python refuses to print more than 4,300 anyway
MAX_TEMPLATE_TAGS = 1_000  # ``{{ … }}`` and ``{% … %}``
MAX_TEMPLATE_NODES = 3_000  # Python compiles the code for that many in ~50 ms (holding the GIL)
# Wall-clock time for one render, by default. Callers that render several templates against
# one clock (a batch's dry run, a recipient's subject and body) pass their own.
RENDER_SECONDS = 1.0
# Threads that run renders off the event loop (per process).
RENDER_THREADS = 2
_MAX_MESSAGE_CHARS = 300

# A body template may place the unsubscribe link itself with {{ unsubscribe_url }}: drafts
# store this marker, and the worker puts each recipient's link in its place when it builds the
# message (and then adds no footer of its own).
UNSUBSCRIBE_MARKER = "%%unsubscribe_url%%"


def template_values(fields: dict[str, Any], email: str) -> dict[str, Any]:
    """What a template can read: the recipient's fields, ``email`` and ``unsubscribe_url``."""
    return {**fields, "email": email, "unsubscribe_url": UNSUBSCRIBE_MARKER}


class TemplateProblem(ValueError):
    """A template that cannot be parsed or rendered; the message says where."""


class TemplateTooExpensive(TemplateProblem):
    """A template that would take too long, or build too much, to render (for these values)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"template too expensive: {reason}")


class _OverBudget(BaseException):
    """Raised inside a render when its budget is spent.

    A BaseException, so that nothing between the checkpoint and :func:`render` — jinja's own
    ``except Exception`` blocks, a filter that catches ``ValueError`` — can swallow it.
    """


# -- the budget of one render --------------------------------------------------------------------


_monotonic = time.monotonic


# A render in a render thread hands the GIL over this often: a thread waiting for it (the
# event loop's) would otherwise wait up to sys.getswitchinterval() (5 ms) for every turn.
_GIVE_WAY_EVERY_SECONDS = 0.001


class _Budget:
    __slots__ = (
        "calls",
        "deadline",
        "depth",
        "give_way_at",
        "produced",
        "steps",
        "time_limit_seconds",
    )

    def __init__(
        self, time_limit_seconds: float, deadline: float | None = None, *, give_way: bool = False
    ) -> None:
        self.time_limit_seconds = time_limit_seconds
        now = _monotonic()
        self.deadline = (
            now + time_limit_seconds
            if deadline is None
            else min(now + time_limit_seconds, deadline)
        )
        self.give_way_at = now + _GIVE_WAY_EVERY_SECONDS if give_way else math.inf
        self.steps = 0
        self.calls = 0
        self.produced = 0
        self.depth = 0

    def step(self) -> None:
        self.steps += 1
        now = _monotonic()
        if self.steps > MAX_STEPS or now > self.deadline:
            if self.steps > MAX_STEPS:
                raise _OverBudget(f"more than {MAX_STEPS} loop iterations, calls and filters")
            self.check_time()
        if now > self.give_way_at:
            time.sleep(0)  # releases the GIL: whoever waits for it runs now
            self.give_way_at = now + _GIVE_WAY_EVERY_SECONDS

    def check_time(self) -> None:
        if _monotonic() > self.deadline:
            raise _OverBudget(f"rendering took longer than {self.time_limit_seconds:g} s")

    def made(self, value: Any) -> Any:
        """Count ``value``, just built, against the budget; return it."""
        if isinstance(value, _SIZED):
            size = len(value)
            if size > MAX_VALUE_CHARS:
                raise _OverBudget(
                    f"a value of {size} characters or items (at most {MAX_VALUE_CHARS})"
                )
            self.produced += size
            if self.produced > MAX_PRODUCED:
                raise _OverBudget(f"builds more than {MAX_PRODUCED} characters in all")
        return value


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "mailroom_template_budget", default=None
)


def _current() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:
        # Not an _OverBudget: outside a render (jinja folding constants at compile time, which
        # catches Exception and leaves the expression to run time) nothing may be evaluated.
        raise RuntimeError("template code evaluated outside a render budget")
    return budget


# Type tuples for isinstance (faster than unions in the checks every operation makes).
_BYTES = (bytes, bytearray)
_TEXT = (str, bytes, bytearray)
_LISTS = (list, tuple)
_SEQUENCES = (str, bytes, bytearray, list, tuple)
_SIZED = (str, bytes, bytearray, list, tuple, dict, set, frozenset)
_COLLECTIONS = (list, tuple, set, frozenset, types.MappingProxyType)
_NUMBERS = (int, float)
_METHODS = (types.BuiltinMethodType, types.MethodType)
_FLOATISH = (bool, float)
_SCALARS = (str, int, float, bool, type(None), Markup)


def _text_size(value: Any, limit: int = MAX_VALUE_CHARS) -> int:
    """About ``len(str(value))`` without building it (containers show their items' reprs);
    stops counting once past ``limit``."""
    if isinstance(value, str):
        return len(value)
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, _FLOATISH) or item is None:
            total += 24
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, _BYTES):
            total += 4 * len(item) + 3
        elif isinstance(item, Namespace):
            stack.append(item._Namespace__attrs)  # type: ignore[attr-defined]
            total += 12
        elif isinstance(item, Mapping):
            total += 2 + 4 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, _COLLECTIONS):
            total += 2 + 2 * len(item)
            stack.extend(item)
        elif isinstance(item, range):
            total += 32
        elif isinstance(item, Iterable) and hasattr(item, "__len__"):  # dict views
            total += 2 + 2 * len(item)  # type: ignore[arg-type]
            stack.extend(item)
        else:  # macros, loops, cyclers, undefined: a short repr
            total += 100
    return total


def _too_expensive(reason: str) -> NoReturn:
    raise _OverBudget(reason)


def _check_width(value: Any, what: str) -> None:
    if isinstance(value, int) and value > MAX_VALUE_CHARS:
        _too_expensive(f"{what} {value} is more than {MAX_VALUE_CHARS}")


def _check_length(size: int, what: str) -> None:
    if size > MAX_VALUE_CHARS:
        _too_expensive(f"{what} would make {size} characters (at most {MAX_VALUE_CHARS})")


def _check_stringable(values: Iterable[Any]) -> None:
    """Values about to be turned into text: a container's text must fit too."""
    for value in values:
        if not isinstance(value, _SCALARS):
            size = _text_size(value)
            if size > MAX_VALUE_CHARS:
                _too_expensive(f"a value whose text is over {MAX_VALUE_CHARS} characters")


def _replaced_size(text: Any, old: Any, new: Any, count: Any) -> int:
    text, old, new = str(text), str(old), str(new)
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * (len(new) - len(old))


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.?)", re.S)


def _check_percent(fmt: str | bytes | bytearray, args: Any) -> None:
    """``fmt % args``: widths and precisions bounded, and room for every field's value."""
    text = fmt.decode("latin-1") if isinstance(fmt, _BYTES) else fmt
    specs = _PERCENT_SPEC.findall(text)
    widest = 0
    for width, precision, _conversion in specs:
        for number in (width, precision):
            if number == "*":
                _too_expensive("'*' widths and precisions are not supported in format strings")
            if number and (len(number) > 9 or int(number) > MAX_VALUE_CHARS):
                _too_expensive(f"a format width or precision of {number} is too large")
            widest = max(widest, int(number or 0))
    if isinstance(args, Mapping):
        values: Iterable[Any] = args.values()
    else:
        values = args if isinstance(args, tuple) else (args,)
    longest = max((_text_size(v) for v in values), default=0)
    _check_length(len(text) + len(specs) * (max(longest, widest) + 32), "this format")


def _check_repeat(seq: Any, count: Any) -> None:
    if not isinstance(count, int) or count <= 0:
        return
    if isinstance(seq, _TEXT):
        size, limit = len(seq), MAX_VALUE_CHARS
    else:
        size, limit = _text_size(seq, MAX_PRODUCED), MAX_PRODUCED
        _check_list_size(len(seq) * count)
    if size * count > limit:
        _too_expensive(f"a repetition that long is not allowed ({count} times {size} > {limit})")


def _check_list_size(items: int) -> None:
    if items > MAX_VALUE_CHARS:
        _too_expensive(f"a list of {items} items (at most {MAX_VALUE_CHARS})")


def _check_lists_added(
    left: list[Any] | tuple[Any, ...], right: list[Any] | tuple[Any, ...]
) -> None:
    # A list holds references: what it costs is its length, and what its items would come to
    # as text (printed, compared) is kept within what a render may build in all.
    _check_list_size(len(left) + len(right))
    text = _text_size(left, MAX_PRODUCED) + _text_size(right, MAX_PRODUCED)
    if text > MAX_PRODUCED:
        _too_expensive(f"a list whose items come to over {MAX_PRODUCED} characters")


def _int_bits(value: Any) -> int:
    return value.bit_length() if isinstance(value, int) else 0


def _check_binop(op: str, left: Any, right: Any) -> None:
    if op == "*":
        if isinstance(left, _SEQUENCES):
            _check_repeat(left, right)
        elif isinstance(right, _SEQUENCES):
            _check_repeat(right, left)
        elif _int_bits(left) + _int_bits(right) > MAX_INT_BITS:
            _too_expensive("a number that large is not allowed")
    elif op == "+":
        if isinstance(left, _TEXT) and isinstance(right, _TEXT):
            _check_length(len(left) + len(right), "'+'")
        elif isinstance(left, _LISTS) and isinstance(right, _LISTS):
            _check_lists_added(left, right)
    elif op == "%":
        if isinstance(left, _TEXT):
            _check_percent(left, right)
    elif op == "**" and isinstance(right, _NUMBERS):
        if right > MAX_EXPONENT:
            _too_expensive(f"an exponent above {MAX_EXPONENT} is not allowed")
        if isinstance(right, int) and _int_bits(left) * right > MAX_INT_BITS:
            _too_expensive("a number that large is not allowed")


def _check_method(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Calls of the ``str`` and ``bytes`` methods whose result grows with an argument (and of
    ``Markup``'s, which wrap them in Python)."""
    owner = getattr(method, "__self__", None)
    if not isinstance(method, _METHODS) or not isinstance(owner, _TEXT):
        return args
    name = method.__name__
    if name in {"center", "ljust", "rjust", "zfill"} and args:
        _check_width(args[0], f"{name} width")
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tabsize, int):
            tabs = owner.count("\t" if isinstance(owner, str) else b"\t")  # type: ignore[arg-type]
            _check_length(len(owner) + tabs * tabsize, "expandtabs")
    elif name == "replace" and len(args) >= 2:
        if isinstance(owner, str) and all(isinstance(a, str) for a in args[:2]):
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            _check_length(_replaced_size(owner, args[0], args[1], count), "replace")
    elif name == "join" and args:
        items = list(args[0])
        _check_length(
            sum(_text_size(item) for item in items) + len(owner) * max(len(items) - 1, 0),
            "join",
        )
        return (items, *args[1:])
    elif name == "translate" and args:
        table = args[0]
        targets = table.values() if isinstance(table, Mapping) else table
        if not isinstance(targets, Iterable):
            _too_expensive("translate needs a mapping")
        longest = max((len(t) for t in targets if isinstance(t, _TEXT)), default=1)
        _check_length(len(owner) * max(longest, 1), "translate")
    return args


# -- bounded filters and globals ------------------------------------------------------------------


def _check_center(value: Any, width: Any = 80) -> None:
    _check_width(width, "center width")


def _check_indent(s: Any, width: Any = 4, first: Any = False, blank: Any = False) -> None:
    size = len(width) if isinstance(width, str) else width
    _check_width(size, "indent width")
    if isinstance(s, str) and isinstance(size, int):
        _check_length(len(s) + (s.count("\n") + 1) * size, "indent")


def _check_wordwrap(
    s: Any,
    width: Any = 79,
    break_long_words: Any = True,
    wrapstring: Any = None,
    break_on_hyphens: Any = True,
) -> None:
    _check_width(width, "wordwrap width")
    if isinstance(s, str) and isinstance(width, int) and width > 0:
        lines = len(s) // width + s.count(" ") + s.count("\n") + 1
        joint = len(wrapstring) if isinstance(wrapstring, str) else 1
        _check_length(len(s) + lines * joint, "wordwrap")


def _check_truncate(
    s: Any, length: Any = 255, killwords: Any = False, end: Any = "...", leeway: Any = None
) -> None:
    _check_width(length, "truncate length")
    _check_width(leeway, "truncate leeway")


def _check_format(value: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str):
        _check_percent(value, kwargs or args)


def _check_replace(s: Any, old: Any, new: Any, count: Any = None) -> None:
    _check_length(_replaced_size(s, old, new, count), "replace")


def _check_batch(value: Any, linecount: Any, fill_with: Any = None) -> None:
    _check_width(linecount, "batch size")


def _check_slice(value: Any, slices: Any, fill_with: Any = None) -> None:
    if isinstance(slices, int) and slices > MAX_RANGE:
        _too_expensive(f"slice count {slices} is more than {MAX_RANGE}")


@jinja2.pass_eval_context
def _join(eval_ctx: nodes.EvalContext, value: Any, d: str = "", attribute: Any = None) -> str:
    items = list(value)
    if attribute is not None:
        items = list(map(make_attrgetter(eval_ctx.environment, attribute), items))
    _check_length(
        sum(_text_size(item) for item in items) + len(str(d)) * max(len(items) - 1, 0), "join"
    )
    joined: str = FILTERS["join"](eval_ctx, items, d)
    return joined


@pass_environment
def _sum(
    environment: jinja2.Environment, iterable: Any, attribute: Any = None, start: Any = 0
) -> Any:
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    budget = _current()
    total = start
    for item in iterable:
        budget.step()
        _check_binop("+", total, item)
        total = budget.made(total + item)
    return total


# Filters that take a container as their value without turning it into text (the rest turn
# their value into text, so a container given to them must have text of a bounded size).
_CONTAINER_FILTERS = frozenset(
    {
        "attr", "batch", "count", "d", "default", "dictsort", "first", "groupby", "items",
        "join", "last", "length", "list", "map", "max", "min", "random", "reject",
        "rejectattr", "reverse", "select", "selectattr", "slice", "sort", "sum", "unique",
    }
)  # fmt: skip
_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _check_center,
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "truncate": _check_truncate,
    "format": _check_format,
    "replace": _check_replace,
    "batch": _check_batch,
    "slice": _check_slice,
}
_FILTER_REPLACEMENTS: dict[str, Callable[..., Any]] = {"join": _join, "sum": _sum}


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` with a checkpoint, its argument checks, and its result counted."""
    check = _FILTER_CHECKS.get(name)
    passed = 1 if _PassArg.from_obj(func) is not None else 0  # context/environment first
    skip = passed + (1 if name in _CONTAINER_FILTERS else 0)  # arguments not turned into text

    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _current()
        budget.step()
        for value in args[skip:]:
            if not isinstance(value, _SCALARS):
                _check_stringable((value,))
        if kwargs:
            _check_stringable(kwargs.values())
        if check is not None:
            check(*args[passed:], **kwargs)
        return budget.made(func(*args, **kwargs))

    return functools.update_wrapper(bounded, func)  # keeps jinja's pass_* marker


def _range(*args: int) -> range:
    numbers = range(*args)
    try:
        size = len(numbers)
    except OverflowError:
        size = MAX_RANGE + 1
    if size > MAX_RANGE:
        _too_expensive(f"Range too big: {size} items (at most {MAX_RANGE})")
    return numbers


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if n > 20 or max > 200:
        _too_expensive("lipsum is limited to 20 paragraphs of 200 words")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` in the sandbox: widths bounded, and the output counted as it is built."""

    def __init__(self, env: jinja2.Environment, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._built = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        for number in re.findall(r"\d+", format_spec):
            if len(number) > 9 or int(number) > MAX_VALUE_CHARS:
                _too_expensive(f"a format width or precision of {number} is too large")
        _check_stringable((value,))
        text = super().format_field(value, format_spec)
        self._built += len(text)
        _check_length(self._built, "str.format")
        return text


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    pass


# -- the environment and its code generator -------------------------------------------------------


class _BudgetedCodeGenerator(CodeGenerator):
    """jinja2's code generator with the render budget's checkpoints compiled in.

    - every ``{% for %}`` iterable goes through ``environment.budget_iter`` (a step per item);
    - ``~`` goes through ``environment.budget_concat`` (sizes checked before joining);
    - slices go through ``environment.budget_value`` (what they copy is counted);
    - a value output with ``{{ }}`` that is not a string goes through ``budget_text`` before it
      becomes text (a list of many references to one long string would print gigabytes);
    - text written into a buffer (macros, call blocks, ``{% set %}`` and ``{% filter %}``
      blocks, recursive loops) is counted by ``environment.budget_written``: it is not
      streamed out, so the output cap cannot see it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop_iterables: set[int] = set()

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        if id(node) in self._loop_iterables:
            self.write("environment.budget_iter(")
            super().visit(node, *args, **kwargs)
            self.write(")")
            return None
        return super().visit(node, *args, **kwargs)

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        self._loop_iterables.add(id(node.iter))
        super().visit_For(node, frame)

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            join = "markup_join"
        else:
            join = "str_join"
        self.write(f"environment.budget_concat({join}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        if not isinstance(node.arg, nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        self.write("environment.budget_value(")
        super().visit_Getitem(node, frame)
        self.write(")")

    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        super()._output_child_pre(node, frame, finalize)
        self.write("environment.budget_text(")

    def _output_child_post(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        self.write(")")
        super()._output_child_post(node, frame, finalize)

    def visit_Output(self, node: nodes.Output, frame: Frame) -> None:
        if frame.buffer is None:
            super().visit_Output(node, frame)
            return
        mark = self.temporary_identifier()
        self.writeline(f"{mark} = len({frame.buffer})")
        super().visit_Output(node, frame)
        self.writeline(f"environment.budget_written({frame.buffer}, {mark})")

    def start_write(self, frame: Frame, node: nodes.Node | None = None) -> None:
        super().start_write(frame, node)
        if frame.buffer is not None:
            self.write("environment.budget_value(")

    def end_write(self, frame: Frame) -> None:
        if frame.buffer is not None:
            self.write(")")
        super().end_write(frame)


class _Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _BudgetedCodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        filters = {name: _FILTER_REPLACEMENTS.get(name, f) for name, f in self.filters.items()}
        self.filters = {name: _bounded_filter(name, f) for name, f in filters.items()}
        self.globals["range"] = _range
        self.globals["lipsum"] = _lipsum

    # Called by the generated code (see _BudgetedCodeGenerator).

    def budget_iter(self, iterable: Any) -> Iterator[Any]:
        budget = _current()
        for item in iterable:
            budget.step()
            yield item

    def budget_concat(self, join: Callable[[Any], str], parts: tuple[Any, ...]) -> str:
        _check_length(sum(_text_size(part) for part in parts), "'~'")
        result: str = _current().made(join(parts))
        return result

    def budget_value(self, value: Any) -> Any:
        return _current().made(value)

    def budget_text(self, value: Any) -> Any:
        if type(value) is not str:
            _check_stringable((value,))
        return value

    def budget_written(self, buffer: list[Any], start: int) -> None:
        budget = _current()
        for piece in buffer[start:]:
            budget.made(piece)
        budget.check_time()

    # The sandbox's own hooks.

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return _current().made(self.binop_table[operator](left, right))

    def call(
        __self,  # jinja's own signature: no keyword argument can clash with these
        __context: Any,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        budget = _current()
        budget.step()
        budget.calls += 1
        if budget.calls > MAX_CALLS:
            _too_expensive(f"more than {MAX_CALLS} calls")
        if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive loop
            args = (__self.budget_iter(args[0]), *args[1:])
        else:
            args = _check_method(__obj, args, kwargs)
        budget.depth += 1
        try:
            if budget.depth > MAX_CALL_DEPTH:
                _too_expensive(f"calls nested more than {MAX_CALL_DEPTH} deep")
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return budget.made(result)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # jinja2's own, with a formatter that bounds widths and counts what it builds.
        if not isinstance(
            value, types.MethodType | types.BuiltinMethodType
        ) or value.__name__ not in ("format", "format_map"):
            return None
        owner: Any = value.__self__
        if not isinstance(owner, str):
            return None
        str_type: type[str] = type(owner)
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            formatter: Formatter
            if isinstance(owner, Markup):
                formatter = _BoundedEscapeFormatter(self, escape=owner.escape)
            else:
                formatter = _BoundedFormatter(self)
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs, args = args[0], ()
            return str_type(formatter.vformat(owner, args, kwargs))

        return functools.update_wrapper(wrapper, value)


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The one sandboxed environment (autoescape off: HTML escaping happens per part)."""
    return _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)


# -- compiling ------------------------------------------------------------------------------------

# Tags that would reach other templates (there are none to reach) or define blocks, whose
# output bypasses the budget's accounting of buffered text.
_UNSUPPORTED: dict[type[nodes.Node], str] = {
    nodes.Block: "block",
    nodes.Extends: "extends",
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "from … import",
}
# A template made only of these, with few nodes and cheap filters, renders in microseconds
# whatever the values: it may render on the event loop (see :func:`is_simple`).
_SIMPLE_NODES = (
    nodes.Output, nodes.TemplateData, nodes.Name, nodes.Const, nodes.Getattr, nodes.Getitem,
    nodes.Filter, nodes.Test, nodes.CondExpr, nodes.If, nodes.And, nodes.Or, nodes.Not,
    nodes.Compare, nodes.Operand, nodes.Concat, nodes.Keyword,
)  # fmt: skip
_CHEAP_FILTERS = frozenset(
    {
        "default", "d", "upper", "lower", "title", "capitalize", "trim", "e", "escape",
        "string", "int", "float", "abs", "round", "length", "count", "first", "last", "safe",
    }
)  # fmt: skip
_MAX_SIMPLE_NODES = 100


@dataclass(frozen=True)
class _Compiled:
    template: jinja2.Template
    fields: frozenset[str]
    simple: bool


_cache: dict[str, _Compiled] = {}
_cache_lock = threading.Lock()
_CACHE_SIZE = 256


def _compiled(source: str) -> _Compiled:
    found = _cache.get(source)  # a dict lookup is atomic: no lock on the way that renders
    if found is not None:
        return found
    compiled = _compile(source)
    with _cache_lock:
        _cache[source] = compiled
        while len(_cache) > _CACHE_SIZE:  # the oldest compiled first
            del _cache[next(iter(_cache))]
    return compiled


def _compile(source: str) -> _Compiled:
    tags = source.count("{{") + source.count("{%")
    if tags > MAX_TEMPLATE_TAGS:
        raise TemplateTooExpensive(f"{tags} tags and expressions (at most {MAX_TEMPLATE_TAGS})")
    env = environment()
    try:
        tree = env.parse(source)
        everything = list(tree.find_all(nodes.Node))
        if len(everything) > MAX_TEMPLATE_NODES:
            raise TemplateTooExpensive(
                f"{len(everything)} template nodes (at most {MAX_TEMPLATE_NODES})"
            )
        for node in everything:
            tag = _UNSUPPORTED.get(type(node))
            if tag is not None:
                raise TemplateProblem(f"line {node.lineno}: {{% {tag} %}} is not supported")
        simple = len(everything) <= _MAX_SIMPLE_NODES and all(
            isinstance(node, _SIMPLE_NODES)
            and (not isinstance(node, nodes.Filter) or node.name in _CHEAP_FILTERS)
            for node in everything
        )
        fields = frozenset(meta.find_undeclared_variables(tree))
        template = env.from_string(tree)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(f"line {exc.lineno}: {exc.message}") from None
    except (RecursionError, SyntaxError) as exc:
        # Python's own limits on the code a template compiles to (blocks nested more than 20
        # deep, 100 levels of indentation) and jinja's recursive parser.
        detail = exc.msg if isinstance(exc, SyntaxError) else "maximum recursion depth"
        raise TemplateProblem(f"nested too deeply ({detail})") from None
    return _Compiled(template=template, fields=fields, simple=simple)


def fields_used(source: str) -> set[str]:
    """Top-level names a template reads; raises :class:`TemplateProblem` on a syntax error
    (and :class:`TemplateTooExpensive` for a template too big to compile)."""
    return set(_compiled(source).fields)


def is_simple(source: str) -> bool:
    """Whether ``source`` is compiled already and cheap to render whatever the values (no
    loops, calls or expensive filters, few nodes): such a render may stay on the event loop."""
    found = _cache.get(source)
    return found is not None and found.simple


# -- rendering ------------------------------------------------------------------------------------


def render(
    source: str,
    values: dict[str, Any],
    *,
    time_limit_seconds: float = RENDER_SECONDS,
    deadline: float | None = None,
) -> str:
    """Render ``source`` with ``values`` on a budget; any failure becomes
    :class:`TemplateProblem` (:class:`TemplateTooExpensive` when the budget is spent).

    The render may take ``time_limit_seconds`` of wall-clock time, and must end by ``deadline``
    (``time.monotonic()``) if one is given.
    """
    compiled = _compiled(source)
    budget = _Budget(time_limit_seconds, deadline, give_way=_render_thread.active)
    token = _BUDGET.set(budget)
    chunks: list[str] = []
    size = 0
    stream = cast(Generator[str, None, None], compiled.template.generate(values))
    try:
        for chunk in stream:
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise TemplateProblem(f"rendered text longer than {MAX_RENDERED_CHARS} characters")
            if _monotonic() > budget.deadline:
                budget.check_time()
            chunks.append(chunk)
    except _OverBudget as exc:
        raise TemplateTooExpensive(str(exc)) from None
    except jinja2.UndefinedError as exc:
        raise TemplateProblem(_short(f"undefined: {exc.message}")) from None
    except SecurityError as exc:
        raise TemplateProblem(_short(f"not allowed in a template: {exc}")) from None
    except RecursionError:
        raise TemplateProblem("nested too deeply (maximum recursion depth)") from None
    except MemoryError:
        raise TemplateTooExpensive("out of memory") from None
    except (
        TypeError,
        ValueError,
        ArithmeticError,
        LookupError,
        AttributeError,
        jinja2.TemplateError,
    ) as exc:
        if isinstance(exc, TemplateProblem):
            raise
        raise TemplateProblem(_short(f"template failed: {exc}")) from None
    finally:
        stream.close()
        _BUDGET.reset(token)
    return "".join(chunks)


def _short(message: str) -> str:
    """An error message as it may be stored and shown (values can be long)."""
    if len(message) <= _MAX_MESSAGE_CHARS:
        return message
    return message[: _MAX_MESSAGE_CHARS - 1] + "…"


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class _RenderThread(threading.local):
    active = False  # True in the render threads


_render_thread = _RenderThread()


def _start_render_thread() -> None:
    _render_thread.active = True


_P = ParamSpec("_P")
_T = TypeVar("_T")


async def in_render_thread(func: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run ``func`` in one of the process's render threads, and wait for it.

    The event loop stays free while a template renders. A render cannot be stopped from
    outside (a thread cannot be killed): its own budget ends it. Waiting here is cancellable;
    a render that has not started when the wait is cancelled never starts.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                RENDER_THREADS,
                thread_name_prefix="mailroom-render",
                initializer=_start_render_thread,
            )
        pool = _pool
    context = contextvars.copy_context()  # log bindings follow the work into the thread
    call = functools.partial(context.run, func, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(pool, call)
