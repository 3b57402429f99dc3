"""The one TLS client context every connection to an engine uses.

Made once at start-up and handed to every outbound client (the relay's, health checks,
model discovery, the admin API's readiness wait, the load poller, serve's start-up
probe), so that all of them verify engines against the same CAs and present the same
client certificate: an engine that the relay reaches is one that health checks reach,
and a bad certificate makes a worker unhealthy instead of failing only real requests.
Building a context reads and parses certificate files, so it is never done per request
or per client.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

__all__ = ["TLSSettingError", "client_ssl_context"]


class TLSSettingError(ValueError):
    """A TLS file that cannot be used; ``option`` names the setting it came from."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.reason = message


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"not a usable certificate or key ({exc.reason or exc})"
    return f"cannot read it ({exc.strerror or exc})"


def client_ssl_context(
    ca_cert_paths: Sequence[str] = (),
    cert_path: str | None = None,
    key_path: str | None = None,
) -> ssl.SSLContext:
    """A client context that verifies engines' certificates and host names.

    The CAs are ``ca_cert_paths`` (PEM files, one or more certificates each) when given,
    else the system's store. ``cert_path`` (with ``key_path``, or a key in the same file)
    is presented to engines that ask for a client certificate (mutual TLS). Raises
    :class:`TLSSettingError` naming the setting whose file is missing or does not load.
    """
    if key_path is not None and cert_path is None:
        raise TLSSettingError("client_key_path", "given without client_cert_path")
    # PROTOCOL_TLS_CLIENT: certificates and host names verified, TLS 1.2 at least.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in ca_cert_paths:
        try:
            context.load_verify_locations(cafile=path)
        except OSError as exc:
            raise TLSSettingError("ca_cert_paths", f"{path}: {_reason(exc)}") from None
    if not ca_cert_paths:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_path is not None:
        _readable("client_cert_path", cert_path)
        if key_path is not None:
            _readable("client_key_path", key_path)
        try:
            context.load_cert_chain(cert_path, key_path)
        except OSError as exc:
            files = cert_path if key_path is None else f"{cert_path} with {key_path}"
            raise TLSSettingError("client_cert_path", f"{files}: {_reason(exc)}") from None
    return context


def _readable(option: str, path: str) -> None:
    try:
        open(path, "rb").close()
    except OSError as exc:
        raise TLSSettingError(option, f"{path}: {_reason(exc)}") from None
