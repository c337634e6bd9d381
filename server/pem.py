"""PEM bytes -> short-lived files, for libraries that load certificates only from paths
(`ssl.SSLContext.load_cert_chain`, prometheus-client's exporter).

`pem_files(cert, key)` yields (cert_path, key_path) in a private temporary directory
(mode 0700) that is removed on exit; load the certificate inside the `with` block.
"""
from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from typing import Iterator


@contextlib.contextmanager
def pem_files(cert: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory(prefix="conserve-tls-") as d:
        paths = []
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            path = os.path.join(d, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(path)
        yield paths[0], paths[1]


def server_ssl_context(cert: bytes, key: bytes) -> ssl.SSLContext:
    """A TLS server context for the given PEM certificate chain and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pem_files(cert, key) as (cert_path, key_path):
        ctx.load_cert_chain(cert_path, key_path)
    return ctx
