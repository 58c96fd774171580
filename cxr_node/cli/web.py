"""``cxr-node web``: the web console in the foreground (a process of its own, beside ``serve``)."""

from __future__ import annotations

import argparse
import logging
from typing import TextIO

log = logging.getLogger(__name__)


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("web", parents=[common], help="run the web console (worklist, studies, audit, outbox) in the foreground",
                       description="Serve the web console on [web] host:port (default 127.0.0.1:8080), with "
                       "HTTPS when [web] certificate and private_key are set. It reads the daemon's database "
                       "and data_dir; run it beside `cxr-node serve` (systemd/cxr-node-web.service). "
                       "Create users first: `cxr-node user add NAME --role admin`.")
    p.add_argument("--host", help="listen on this address instead of [web] host")
    p.add_argument("--port", type=int, help="listen on this port instead of [web] port")
    p.set_defaults(run=run)


def run(settings, args: argparse.Namespace, out: TextIO) -> int:
    from dataclasses import replace

    import uvicorn

    from cxr_node.cli._db import open_database
    from cxr_node.config import web_warning
    from cxr_node.errors import ConfigError, CxrNodeError
    from cxr_node.web.app import create_app

    w = settings.web
    host, port = args.host or w.host, args.port or w.port
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be from 1 to 65535")
    for p in (w.certificate, w.private_key):
        if p is not None and not p.is_file():
            raise ConfigError(f"[web] certificate/private_key: {p} not found")
    with open_database(settings) as db:
        app = create_app(settings, db)
        scheme = "https" if w.tls else "http"
        plain = web_warning(replace(settings, web=replace(w, host=host)))
        if plain:
            log.warning("%s", plain)
        # access_log off: its lines carry query strings (a patient ID search); the app logs paths only.
        # proxy headers only from [web] trusted_proxies: otherwise the address audited and throttled
        # is the TCP peer's, never a header any client could forge. Behind a trusted proxy it is the
        # client the proxy names, and X-Forwarded-Proto https makes the cookies Secure.
        trusted = [str(n) for n in w.trusted_proxies]
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, server_header=False,
                                proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None,
                                ssl_certfile=str(w.certificate) if w.certificate else None,
                                ssl_keyfile=str(w.private_key) if w.private_key else None,
                                timeout_graceful_shutdown=10)
        server = _Server(config)
        # said once the socket is bound (uvicorn's own "Application startup complete" comes before the
        # bind, so a busy port used to log success and then fail)
        server.on_listening = lambda: log.info("web console listening on %s://%s:%d (database %s)", scheme, host,
                                               port, db.redacted_url)
        try:
            server.run()
        except SystemExit as e:  # uvicorn exits this way when it cannot bind (its error is logged above)
            if e.code not in (0, None):
                raise CxrNodeError(f"the web console could not listen on {host}:{port} (in use, or not an "
                                   "address of this machine): set [web] host/port or pass --host/--port") from None
            raise
    log.info("web console stopped")
    return 0


def _server_class():
    import contextlib
    import signal

    import uvicorn

    uv_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _BeforeBindFilter) for f in uv_log.filters):
        uv_log.addFilter(_BeforeBindFilter())

    class Server(uvicorn.Server):
        """uvicorn's server, but SIGTERM/SIGINT end it with exit status 0 after the graceful
        shutdown (as `serve` does), instead of re-raising the signal; a second one forces it."""

        on_listening = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and self.on_listening is not None:
                self.on_listening()

        @contextlib.contextmanager
        def capture_signals(self):
            def stop(signum, frame) -> None:
                if self.should_exit:
                    self.force_exit = True
                self.should_exit = True

            old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    return Server


def _Server(config):
    return _server_class()(config)


class _BeforeBindFilter(logging.Filter):
    """Drops uvicorn's "Application startup complete" / "Waiting for application startup": they
    come before the port is bound; ours ("web console listening") comes after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Application startup complete", "Waiting for application startup"))
