"""A local HTTP server that speaks Groq's OpenAI-compatible chat-completions API.

The real ``groq`` SDK is pointed at it through its base URL. Each test scripts the replies:
``replies`` is consumed in order (a dict is a chat completion's message content or an HTTP
error to send), and when it runs out, ``default`` answers. Every request body is recorded.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

COMPLETIONS_PATH = "/openai/v1/chat/completions"


@dataclass
class Reply:
    """One scripted answer: content for a 200, or an error status with headers and a body."""

    content: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0
    error: str = "error"


def good_draft(request: dict[str, Any]) -> Reply:
    """A valid draft that names the recipient found in the request's user message."""
    facts = recipient_facts(request)
    name = facts.get("name", "there")
    body = (
        f"Hello {name},\n\nI came across your work at {facts.get('company', 'your company')} "
        "and thought this role could interest you. Would you have ten minutes this week?"
    )
    return Reply(json.dumps({"subject": f"A role for you, {name}", "body": body}))


def recipient_facts(request: dict[str, Any]) -> dict[str, Any]:
    user = next(m["content"] for m in request["messages"] if m["role"] == "user")
    match = re.search(r"<recipient>\s*(\{.*?\})\s*</recipient>", user, re.DOTALL)
    return dict(json.loads(match.group(1))) if match else {}


@dataclass
class FakeGroq:
    replies: list[Reply] = field(default_factory=list)
    default: Callable[[dict[str, Any]], Reply] = good_draft
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(COMPLETIONS_PATH, self._completions)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def reset(self) -> None:
        self.replies.clear()
        self.requests.clear()
        self.headers.clear()
        self.default = good_draft

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        reply = self.replies.pop(0) if self.replies else self.default(body)
        if reply.delay_seconds:
            await asyncio.sleep(reply.delay_seconds)
        if reply.status != 200:
            return web.json_response(
                {"error": {"message": reply.error, "type": "api_error"}},
                status=reply.status,
                headers=reply.headers,
            )
        return web.json_response(
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.content},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {"prompt_tokens": 120, "completion_tokens": 45, "total_tokens": 165},
            }
        )
