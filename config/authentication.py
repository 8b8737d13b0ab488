"""API token authentication: knox's tokens, checked with one indexed query."""

from __future__ import annotations

import binascii
from typing import Any

from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from drf_spectacular.contrib.knox_auth_token import KnoxTokenScheme
from knox.auth import TokenAuthentication as KnoxTokenAuthentication
from knox.crypto import hash_token
from knox.models import get_token_model
from knox.settings import knox_settings
from knox.signals import token_expired
from rest_framework.exceptions import AuthenticationFailed


class TokenAuthentication(KnoxTokenAuthentication):
    """knox's `Token <token>` authentication, looked up by the token's digest.

    knox stores `digest = SHA-512(token)` as the table's primary key, so the token
    is found by one primary-key lookup (joined with its user). knox itself selects
    the tokens sharing the token's first 15 characters and, for each, loads every
    token of the user to delete the expired ones: two queries per request. Here an
    expired token is rejected (and deleted) when presented; the expired tokens of
    a user that are never presented again are deleted by the `integration.purge`
    housekeeping task. Accepts and rejects exactly the tokens knox does.
    """

    def authenticate_credentials(self, token: bytes) -> tuple[Any, Any]:
        invalid = _("Invalid token.")
        try:
            digest = hash_token(token.decode("utf-8"))
        except (UnicodeDecodeError, TypeError, binascii.Error):
            raise AuthenticationFailed(invalid) from None
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
        return self.validate_user(auth_token)


class TokenScheme(KnoxTokenScheme):
    """The OpenAPI security scheme of `TokenAuthentication`: knox's (`knoxApiToken`)."""

    target_class = "config.authentication.TokenAuthentication"
