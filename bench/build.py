"""CPU per message built: Mailroom's bytes writer next to the ``email.mime`` builder it replaced.

Both build the same message (a plain-text body of about 1 KB with a few non-ASCII letters, its
HTML part, an unsubscribe link and its footer: about 3 KB on the wire) ``--messages`` times in
a row, with a non-ASCII subject that is either the same for every message (a batch whose
subject template names no field) or different each time (``Hello {{ name }}``), and with a
different ASCII subject each time. Each run's CPU time (``time.process_time``) per message is
recorded; the median of ``--repeat`` runs is printed. The old builder is
``tests/legacy_message.py`` (``email.mime`` classes, compat32 policy, ``as_bytes``). No
database, no SMTP: only the build.

    uv run python -m bench.build [--messages 2000] [--repeat 7]
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench import harness
from tests.legacy_message import legacy_wire_bytes
from worker.smtp import build_message

BODY = (
    "Hi Ada,\n\n"
    "thank you for signing up to the Grüße newsletter. Every Monday we send a short digest of\n"
    "what changed in the project, with links to the longer write-ups on the site.\n\n"
    "This week: faster builds, a new page for suppressions, and notes on DKIM keys = security.\n"
    "The worker now writes each message's bytes itself instead of going through the MIME\n"
    "classes, which cuts the CPU each email costs; the numbers are in the benchmarks page.\n\n"
    "Operators asked for a clearer view of throttling: when a server answers 421 or 451, the\n"
    "worker lowers how many messages it sends at once and raises it again as they succeed.\n"
    "Both the limit and the replies that lowered it are on the dashboard.\n\n"
    "If you have questions, reply to this email; a person reads every answer, usually within\n"
    "a day or two. Café, naïve, façade: the usual suspects still come through unharmed.\n\n"
    "Regards,\nThe Mailroom team\n"
)
VALUES: dict[str, Any] = {
    "sender": "news@example.com",
    "to": "ada.lovelace@example.org",
    "subject": "Your weekly digest — Grüße",
    "body": BODY,
    "message_id": "<mailroom.7d0c2a8e-5b9f-4c6a-9a1e-3f4b2c1d0e9f.123456@example.com>",
    "unsubscribe_url": "https://mail.example.com/u/YWRhLmxvdmVsYWNlQGV4YW1wbGUub3JnCm5ld3M.k3Jz0s",
    "unsubscribe_mailto": "unsubscribe@example.com",
}


SUBJECT = "Your weekly digest — Grüße"


def new_bytes(subject: str) -> bytes:
    return build_message(**{**VALUES, "subject": subject}).data


def old_bytes(subject: str) -> bytes:
    return legacy_wire_bytes(**{**VALUES, "subject": subject})


SCENARIOS: dict[str, Callable[[int], str]] = {
    "same": lambda i: SUBJECT,
    "personalised": lambda i: f"{SUBJECT}, User {i}",
    "personalised, ascii": lambda i: f"Your weekly digest, User {i}",
}


def cpu_per_message_us(
    build: Callable[[str], bytes], messages: int, subject: Callable[[int], str]
) -> float:
    subjects = [subject(i) for i in range(messages)]
    gc.collect()
    started = time.process_time()
    for subject in subjects:
        build(subject)
    return (time.process_time() - started) / messages * 1e6


def run(messages: int, repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "messages": messages,
        "repeat": repeat,
        "body_chars": len(BODY),
        "wire_bytes": {"new": len(new_bytes(SUBJECT)), "old": len(old_bytes(SUBJECT))},
    }
    for scenario, subject in SCENARIOS.items():
        for name, build in (("old", old_bytes), ("new", new_bytes)):
            build(SUBJECT)  # imports and caches warm
            samples = [cpu_per_message_us(build, messages, subject) for _ in range(repeat)]
            results[f"{scenario} subject, {name}"] = {
                "median_us": round(statistics.median(samples), 1),
                "samples": [round(x, 1) for x in samples],
            }
    return results


def main() -> None:
    p = harness.parser("build", __doc__)
    p.add_argument("--messages", type=int, default=2000, help="messages built per run")
    p.add_argument("--repeat", type=int, default=7, help="runs per builder")
    args = p.parse_args()
    results = run(args.messages, args.repeat)
    sizes = results["wire_bytes"]
    print(f"\nCPU per message built, median of {args.repeat} runs of {args.messages}")
    print(f"(a {results['body_chars']}-character body; {sizes['new']} bytes on the wire)\n")
    print(f"{'subject':>22} {'email.mime':>11} {'bytes':>9} {'ratio':>6}")
    for scenario in SCENARIOS:
        old = results[f"{scenario} subject, old"]["median_us"]
        new = results[f"{scenario} subject, new"]["median_us"]
        print(f"{scenario:>22} {old:>8.1f} µs {new:>6.1f} µs {old / new:>5.1f}x")
    harness.write(args.json, results)


if __name__ == "__main__":
    main()
