"""Recognising a git URL of the GitHub host the reconciler talks to (an Application's ``repoURL``)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from reconciler.model import OWNER_REPO

_SCP_LIKE = re.compile(r"^(?:[A-Za-z0-9._-]+@)?(?P<host>[A-Za-z0-9.-]+):(?P<path>[^/].*)$")


def repository_from_url(url: str, web_url: str) -> str | None:
    """``owner/repo`` (lower case, so every spelling of one repository gives one ``repoUrl``) of a git URL on
    the GitHub host of ``web_url`` (``github.web_url``), else ``None``.

    Accepts ``https://HOST/o/r(.git)(/)``, ``http://``, ``ssh://git@HOST/o/r.git`` and ``git@HOST:o/r.git``; when
    ``web_url`` has a path (a proxy serving GitHub under ``https://HOST/PREFIX``), the URL's path must start
    with it.
    """
    web = urlsplit(web_url)
    want = web.hostname
    prefix = web.path.strip("/").lower()
    text = url.strip()
    host: str | None
    if "://" in text:
        try:
            parts = urlsplit(text)
            host = parts.hostname
        except ValueError:
            return None
        if parts.scheme.lower() not in ("http", "https", "ssh", "git"):
            return None
        path = parts.path
    elif match := _SCP_LIKE.match(text):
        host, path = match.group("host"), match.group("path")
    else:
        return None
    if not host or not want or host.lower() != want.lower():
        return None
    path = path.strip("/")
    if prefix:
        if not path.lower().startswith(f"{prefix}/"):
            return None
        path = path[len(prefix) + 1 :]
    path = path.removesuffix(".git")
    if not OWNER_REPO.fullmatch(path):
        return None
    return path.lower()
