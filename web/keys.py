"""Typed keys for what the web application keeps in its state."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from shared.accounts import Principal
from shared.db import Database
from shared.settings import Settings
from web.auth import Authenticator, LoginLimiter, Session
from web.captured_mail import CapturedMail
from web.webhooks.sns import SnsClient

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
AUTH = web.AppKey("auth", Authenticator)
LOGIN_LIMITER = web.AppKey("login_limiter", LoginLimiter)
CAPTURED_MAIL = web.AppKey("captured_mail", CapturedMail)
METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
# Provider webhooks: the SNS certificate fetcher, and failed authentications per client.
SNS = web.AppKey("sns", SnsClient)
WEBHOOK_LIMITER = web.AppKey("webhook_limiter", LoginLimiter)

# Per request, set by the middlewares.
REQUEST_ID = web.RequestKey("request_id", str)
AUTH_KIND = web.RequestKey("auth_kind", str)  # "token" or "session"
SESSION = web.RequestKey("session", Session)
PRINCIPAL = web.RequestKey("principal", Principal)  # who the request acts for
