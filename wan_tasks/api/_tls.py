"""The TLS context the WaveSpeed clients verify the service with, one per process.

httpx makes a new `ssl.SSLContext` for every client it builds, loading the whole CA bundle
into it: 25-50 ms of CPU each time on the benchmark machine, more than a whole poll. A flow run
builds a client per event loop, so one video paid it on its way to the submit. A context is
safe to share between clients, threads and event loops (each connection gets its own SSL
object from it), so the clients share one, built the way httpx builds its default (honouring
SSL_CERT_FILE and SSL_CERT_DIR, else certifi's bundle) and rebuilt when those change.
"""

from __future__ import annotations

import functools
import os
import ssl

import certifi


def shared_ssl_context() -> ssl.SSLContext:
    """httpx's default verifying context, made once per CA setting."""
    return _context_for(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=4)
def _context_for(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    # As httpx.create_ssl_context builds its default, from the values the cache is keyed on.
    if cert_file:
        return ssl.create_default_context(cafile=cert_file)
    if cert_dir:
        return ssl.create_default_context(capath=cert_dir)
    return ssl.create_default_context(cafile=certifi.where())


__all__ = ["shared_ssl_context"]
