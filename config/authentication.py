"""API token authentication: knox's tokens, checked with one indexed query, and
remembered for a few seconds per process."""

from __future__ import annotations

import binascii
import copy
import time
from datetime import datetime
from typing import Any, NamedTuple

from django.conf import settings
from django.db.models.signals import post_delete, post_save
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from drf_spectacular.contrib.knox_auth_token import KnoxTokenScheme
from knox.auth import TokenAuthentication as KnoxTokenAuthentication
from knox.crypto import hash_token
from knox.models import get_token_model
from knox.settings import knox_settings
from knox.signals import token_expired
from rest_framework.exceptions import AuthenticationFailed

#: At most this many tokens are remembered per process (then it starts over).
MAX_REMEMBERED = 1000


class _Remembered(NamedTuple):
    checked_at: float  # time.monotonic()
    expiry: datetime | None
    user: Any
    token: Any


#: Tokens checked recently in this process, by digest (never the token itself).
_remembered: dict[str, _Remembered] = {}


class TokenAuthentication(KnoxTokenAuthentication):
    """knox's `Token <token>` authentication, looked up by the token's digest.

    knox stores `digest = SHA-512(token)` as the table's primary key, so the token
    is found by one primary-key lookup (joined with its user). knox itself selects
    the tokens sharing the token's first 15 characters and, for each, loads every
    token of the user to delete the expired ones: two queries per request. Here an
    expired token is rejected (and deleted) when presented; the expired tokens of
    a user that are never presented again are deleted by the `integration.purge`
    housekeeping task.

    A token that passed is remembered in this process for
    `API_TOKEN_CACHE_SECONDS` (its digest, expiry and user), so the calls that
    follow need no query. Its expiry is checked on every call, so an expired token
    is refused at once. Deleting a token, or saving its user (deactivation), in
    this process forgets it at once; done elsewhere (another API process, the
    admin on another server), the token keeps working in a process that checked it
    for at most that many seconds. Unknown and refused tokens are never
    remembered. `0` turns this off.
    """

    def authenticate_credentials(self, token: bytes) -> tuple[Any, Any]:
        invalid = _("Invalid token.")
        try:
            digest = hash_token(token.decode("utf-8"))
        except (UnicodeDecodeError, TypeError, binascii.Error):
            raise AuthenticationFailed(invalid) from None
        seconds = settings.API_TOKEN_CACHE_SECONDS
        if seconds > 0:
            known = _remembered.get(digest)
            if known is not None:
                if time.monotonic() - known.checked_at < seconds and (
                    known.expiry is None or known.expiry >= timezone.now()
                ):
                    # Copies: nothing a request sets on its user (or token) is
                    # seen by the next request.
                    user, auth_token = copy.copy(known.user), copy.copy(known.token)
                    auth_token.user = user
                    return user, auth_token
                _remembered.pop(digest, None)
        auth_token = (
            get_token_model()
            .objects.select_related("user")
            .filter(digest=digest)
            .first()
        )
        if auth_token is None:
            raise AuthenticationFailed(invalid)
        if auth_token.expiry is not None and auth_token.expiry < timezone.now():
            username = auth_token.user.get_username()
            auth_token.delete()
            token_expired.send(
                sender=self.__class__, username=username, source="auth_token"
            )
            raise AuthenticationFailed(invalid)
        if knox_settings.AUTO_REFRESH and auth_token.expiry:
            self.renew_token(auth_token)
        user, auth_token = self.validate_user(auth_token)
        if seconds > 0 and not knox_settings.AUTO_REFRESH:
            if len(_remembered) >= MAX_REMEMBERED:
                _remembered.clear()
            kept_user, kept_token = copy.copy(user), copy.copy(auth_token)
            kept_token.user = kept_user
            _remembered[digest] = _Remembered(
                time.monotonic(), auth_token.expiry, kept_user, kept_token
            )
        return user, auth_token


def forget_token(digest: str) -> None:
    """Forget a remembered token in this process (the next call checks the table)."""
    _remembered.pop(digest, None)


def forget_user(user_id: Any) -> None:
    """Forget every remembered token of a user in this process."""
    for digest, known in list(_remembered.items()):
        if known.user.pk == user_id:
            _remembered.pop(digest, None)


def _token_changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    forget_token(instance.digest)


def _user_changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    forget_user(instance.pk)


post_delete.connect(_token_changed, sender=knox_settings.TOKEN_MODEL)
post_save.connect(_token_changed, sender=knox_settings.TOKEN_MODEL)
post_delete.connect(_user_changed, sender=settings.AUTH_USER_MODEL)
post_save.connect(_user_changed, sender=settings.AUTH_USER_MODEL)


class TokenScheme(KnoxTokenScheme):
    """The OpenAPI security scheme of `TokenAuthentication`: knox's (`knoxApiToken`)."""

    target_class = "config.authentication.TokenAuthentication"
