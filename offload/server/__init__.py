"""`offload serve`: one loaded model behind an OpenAI-compatible HTTP API and a chat page (app.py), generating one
sequence at a time (engine.py), with the wire format kept in protocol.py."""
from __future__ import annotations

from ..api import Model
from ..errors import OffloadError
from .app import ServerOptions, create_app

__all__ = ["ServerOptions", "check_address", "create_app", "serve"]


def serve(model: Model, options: ServerOptions, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning") -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    uvicorn.run(create_app(model, options), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def check_address(host: str, port: int) -> None:
    """Fail before the model loads when the address cannot be served: a port in use, a host not on this machine."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise OffloadError(f"cannot serve on host {host!r}: {error.strerror}; use 127.0.0.1, 0.0.0.0 or one of "
                           "this machine's addresses") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            raise OffloadError(f"cannot serve on {host}:{port}: {error.strerror}; pick another --port "
                               "(or stop what uses it)") from None
