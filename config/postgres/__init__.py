"""The metadata database's PostgreSQL backend: Django's, with a cheaper health
check (see `base.DatabaseWrapper.is_usable`)."""
