"""The template sandbox's budget: hostile templates stop quickly and small, others render as
jinja2 renders them."""

from __future__ import annotations

import time

import pytest

from shared.templating import (
    MAX_RENDERED_CHARS,
    TemplateProblem,
    TemplateTooExpensive,
    fields_used,
    is_simple,
    render,
)
from tests.memory import peak_rss

VALUES = {"name": "Ada", "items": "a,b,c", "n": 3, "email": "ada@example.org"}

# Each of these would take seconds of CPU or gigabytes of memory in a plain sandbox.
HOSTILE = {
    "nested range loops": (
        "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    ),
    "center 10**9": '{{ ("a"|center(10**9))|length }}',
    "ljust method": '{{ "a".ljust(10**9)|length }}',
    "Markup's center method": '{{ ("a"|safe).center(10**9)|length }}',
    "long string repeat": '{{ "a" * 10000 * 10000 }}',
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "fan-out macro": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"
    ),
    "range 10**6": "{% for x in range(10**6) %}{{ x }}{% endfor %}",
    "format filter width": '{{ "%999999999s"|format("a") }}',
    "format star width": '{{ "%*s"|format(10**9, "a") }}',
    "str.format width": '{{ "{:>999999999}".format("a") }}',
    "str.format nested width": '{{ "{:>{}}".format("a", 10**9) }}',
    "str.format repeated field": '{{ ("{0}" * 10000).format("x" * 10000) }}',
    "percent repeated field": '{{ "%(a)s" * 10000 % {"a": "x" * 10000} }}',
    "wordwrap 10**9": '{{ "a"*10000|wordwrap(10**9) }}',
    "wordwrap long wrapstring": '{{ ("a "*5000)|wordwrap(1, wrapstring="x"*1000) }}',
    "indent": '{{ ("\\n"*10000)|indent(10000) }}',
    "truncate": '{{ "a"|truncate(10**9) }}',
    "doubling with ~": (
        '{% set ns = namespace(s="ab") %}{% for i in range(40) %}'
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"
    ),
    "doubling with +": (
        '{% set ns = namespace(s="ab") %}{% for i in range(40) %}'
        "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}"
    ),
    "replace": '{{ ("x"*10000)|replace("x", "x"*10000) }}',
    "macro buffer": (
        '{% macro m() %}{% for i in range(10000) %}{{ "x"*10000 }}{% endfor %}{% endmacro %}'
        "{{ m()|length }}"
    ),
    "set block": (
        '{% set x %}{% for i in range(10000) %}{{ "x"*10000 }}{% endfor %}{% endset %}'
        "{{ x|length }}"
    ),
    "lipsum": "{{ lipsum(10**6)|length }}",
    "list repeat and join": '{{ (["x"*10000]*10000)|join }}',
    "list literal printed": '{% set s = "x"*100000 %}{{ [s, s, s, s, s, s, s, s, s, s] }}',
    "integer squaring": (
        "{% set ns = namespace(x=2**100) %}{% for i in range(30) %}"
        "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x > 0 }}"
    ),
    "expandtabs": '{{ ("\\t"*10000).expandtabs(100000) }}',
    "translate": '{{ ("a"*10000).translate({97: "b"*10000}) }}',
    "str.join": '{{ ("x"*10000).join(["a"]*10000) }}',
    "batch fill": "{{ [1]|batch(10**9, 0)|list|length }}",
    "map center": '{{ range(10000)|map("center", 100000)|join }}',
    "sum of lists": "{{ ([[1]*1000]*1000)|sum(start=[])|length }}",
    "loops over a long string": (
        '{% set s = "x"*100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}'
    ),
    "slices kept in a list": (
        '{% set ns = namespace(l=[], s="x"*100000) %}{% for i in range(10000) %}'
        "{% set ns.l = ns.l + [ns.s[1:]] %}{% endfor %}{{ ns.l|length }}"
    ),
    "recursive loop": "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}",
    "tojson escapes, again and again": ('{{ ("\\\\"*10000)' + "|tojson" * 14 + "|length }}"),
}


@pytest.mark.parametrize("source", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_template_is_stopped_quickly_and_small(source: str) -> None:
    with peak_rss() as memory:
        started = time.perf_counter()
        with pytest.raises(TemplateTooExpensive, match="template too expensive"):
            render(source, VALUES)
        elapsed = time.perf_counter() - started
    assert elapsed < 1.5, elapsed
    assert memory.growth_mb < 50, f"the render grew the process by {memory.growth_mb:.0f} MB"


def test_the_output_cap_is_enforced_while_the_text_streams() -> None:
    source = '{% for i in range(10000) %}{{ "x" * 10000 }}{% endfor %}'
    with peak_rss() as memory:
        with pytest.raises(TemplateProblem, match=f"longer than {MAX_RENDERED_CHARS}"):
            render(source, VALUES)
    assert memory.growth_mb < 20


def test_a_render_stops_at_its_time_limit() -> None:
    # Every step is costly (unique walks 1,800 characters in Python) but few enough not to
    # reach the step cap: the deadline is what stops it.
    source = (
        '{% set s = "ab " * 600 %}{% for c in s %}{% for d in s %}'
        "{% set n = s|unique|list|length %}{% endfor %}{% endfor %}"
    )
    started = time.perf_counter()
    with pytest.raises(TemplateTooExpensive, match=r"took longer than 0\.3 s"):
        render(source, VALUES, time_limit_seconds=0.3)
    assert time.perf_counter() - started < 0.6


def test_a_deadline_shared_by_several_renders_ends_them_all() -> None:
    source = "{% for c in email %}{{ c }}{% endfor %}"
    with pytest.raises(TemplateTooExpensive, match="took longer than"):
        render(source, VALUES, deadline=time.monotonic() - 1)


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{% block b %}x{% endblock %}", "block %} is not supported"),
        ('{% include "other" %}', "include %} is not supported"),
        ("{% for a in 'ab' %}" * 25 + "x" + "{% endfor %}" * 25, "nested too deeply"),
        ("{% if 1 %}" * 120 + "x" + "{% endif %}" * 120, "nested too deeply"),
        ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "nested too deeply"),
        ("{{ a }}" * 3000, "template too expensive: 3000 tags"),
        ("{{ " + " ~ ".join(["a"] * 6000) + " }}", "template too expensive: .* nodes"),
    ],
)
def test_templates_jinja_or_python_cannot_compile_are_refused_cleanly(
    source: str, fragment: str
) -> None:
    with pytest.raises(TemplateProblem, match=fragment):
        fields_used(source)


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{{ range(3)|map('nofilter')|list }}", "No filter named"),
        ("{{ {}['k' * 5000] }}", "undefined"),
    ],
)
def test_runtime_errors_become_short_template_problems(source: str, fragment: str) -> None:
    with pytest.raises(TemplateProblem, match=fragment) as raised:
        render(source, VALUES)
    assert len(str(raised.value)) <= 300


LEGIT = {
    "Hello {{ name }}": "Hello Ada",
    'Hi {{ missing | default("there") }}': "Hi there",
    "{% for c in name %}[{{ loop.index }}{{ c }}{{ loop.length }}]{% endfor %}": "[1A3][2d3][3a3]",
    "{% for c in name %}{{ c }}{% if not loop.last %},{% endif %}{% endfor %}": "A,d,a",
    "{% for c in '' %}x{% else %}empty{% endfor %}": "empty",
    "{% for c in name if c != 'd' %}{{ c }}{% endfor %}": "Aa",
    "{% for i in range(2) %}{% for j in range(2) %}{{ i }}{{ j }} {% endfor %}{% endfor %}": (
        "00 01 10 11 "
    ),
    "{% macro hi(who) %}Hi {{ who|upper }}!{% endmacro %}{{ hi(name) }} {{ hi('x') }}": (
        "Hi ADA! Hi X!"
    ),
    "{% macro box() %}[{{ caller() }}]{% endmacro %}{% call box() %}{{ name }}{% endcall %}": (
        "[Ada]"
    ),
    "{% set x %}{{ name }}-{{ name }}{% endset %}{{ x }}": "Ada-Ada",
    "{% filter upper %}hi {{ name }}{% endfilter %}": "HI ADA",
    "{{ items.split(',')|join(' & ') }}": "a & b & c",
    '{{ "%05.1f|%s"|format(3.14159, name) }}': "003.1|Ada",
    '{{ "{:>6}|{}".format(name, n) }}': "   Ada|3",
    '{{ "%s has %d" % (name, n) }}': "Ada has 3",
    "{{ name ~ '/' ~ n }}": "Ada/3",
    "{{ name[1:] }}{{ name[::-1] }}": "daadA",
    "{{ n * 2 + 1 }} {{ 2 ** 10 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ 'ab' * 3 }}": "7 1024 3 1 ababab",
    (
        "{% for x in [[1, [2]], 3] recursive %}"
        "{% if x is iterable %}({{ loop(x) }}){% else %}{{ x }}{% endif %}{% endfor %}"
    ): "(1(2))3",
    (
        "{% set ns = namespace(t=0) %}{% for i in range(5) %}{% set ns.t = ns.t + i %}"
        "{% endfor %}{{ ns.t }}"
    ): "10",
    "{{ range(5)|sum }} {{ [[1], [2]]|sum(start=[]) }}": "10 [1, 2]",
    "[{{ name|center(7) }}] {{ 'aaa bbb'|wordwrap(4) }}": "[  Ada  ] aaa\nbbb",
    "{{ 'hello world, again'|truncate(9, True, '') }} {{ 'a\nb'|indent(2, true) }}": (
        "hello wor   a\n  b"
    ),
    "{{ [1, 'a'] }} {{ {'k': 1} }} {{ {'a': name}|tojson }}": "[1, 'a'] {'k': 1} {\"a\": \"Ada\"}",
    "{% autoescape true %}{{ '<b>' ~ name }}{% endautoescape %}": "&lt;b&gt;Ada",
    "{{ 'a\tb'.expandtabs(4) }} {{ name.replace('A', 'Z') }}": "a   b Zda",
    "{{ lipsum(2, false)|wordcount > 10 }}": "True",
    "{% for i in range(10000) %}{% endfor %}{{ 'x' * 100000 }}": "x" * 100_000,
    "{{ ('x' * 99000)|join }}{{ (['y' * 1000] * 100)|length }}": "x" * 99_000 + "100",
}


@pytest.mark.parametrize(("source", "expected"), LEGIT.items(), ids=range(len(LEGIT)))
def test_ordinary_templates_render_as_before(source: str, expected: str) -> None:
    assert render(source, VALUES) == expected


def test_only_straight_line_templates_with_cheap_filters_count_as_simple() -> None:
    simple = ["Hello {{ name }}", 'Hi {{ name | default("there") | title }}', "{{ a ~ b }}"]
    complex_ = [
        "{% for c in name %}{% endfor %}",
        "{{ name.upper() }}",
        "{{ name|wordwrap(3) }}",
        "{{ name * 3 }}",
        "{{ name[1:] }}",
        "{% macro m() %}{% endmacro %}",
        "{{ a }}" * 101,
    ]
    assert not is_simple("Never compiled {{ name }}")
    for source in simple + complex_:
        fields_used(source)
    assert [is_simple(s) for s in simple] == [True] * len(simple)
    assert [is_simple(s) for s in complex_] == [False] * len(complex_)
