"""Provider webhooks for bounces and complaints: Amazon SES through SNS (``ses.py``, with the
SNS signature in ``sns.py``), Postmark (``postmark.py``) and SendGrid (``sendgrid.py``).

Each route is public to the auth middleware and authenticates itself: a signature checked
against the provider's key, or Postmark's Basic credentials. What they share is in
``common.py`` (reading and refusing a request) and ``endpoint.py`` (the wrapper every route
runs in, and the one transaction that records a delivery and its suppressions). The package
itself imports none of them, so ``web/keys.py`` can name :class:`web.webhooks.sns.SnsClient`.
"""
