"""Helpers for the web console tests: ``cxr-node web`` as a subprocess on a free 127.0.0.1 port,
users made with the real CLI, and a small cookie-keeping HTTP client (urllib) that does not
follow redirects, so a test sees exactly what the server answered."""

from __future__ import annotations

import html.parser
import http.cookiejar
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from conftest import PY, REPO, cli, free_port, wait_port


def add_user(config: Path, name: str, role: str, password: str) -> None:
    """`cxr-node user add` with the password on standard input (not a terminal)."""
    p = subprocess.run([PY, "-m", "cxr_node", "--config", str(config), "user", "add", name, "--role", role],
                       input=password + "\n", capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr


class WebConsole:
    """One `cxr-node web` subprocess for a node's config (it shares the node's database)."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> "WebConsole":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([PY, "-m", "cxr_node", "--config", str(self.config), "web", "--port",
                                      str(self.port)], stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_port(self.port, proc=self.proc, timeout=30)
        return self

    def stop(self) -> int | None:
        """SIGTERM; the exit status (0 after a graceful shutdown), or None if it had to be killed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                return None
            finally:
                self._log.close()
        return self.proc.returncode

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    @property
    def location(self) -> str | None:
        return self.headers.get("location")


def _headers(msg) -> dict[str, str]:
    """Lower-case names; several Set-Cookie headers joined by newlines."""
    out = {k.lower(): v for k, v in msg.items()}
    if msg.get_all("Set-Cookie"):
        out["set-cookie"] = "\n".join(msg.get_all("Set-Cookie"))
    return out


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **kw):
        return None


class _Inputs(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if tag == "input" and a.get("name") and "value" in a:
            self.values.setdefault(a["name"], a["value"] or "")


def hidden(html_text: str, name: str) -> str | None:
    """The value of the first input named ``name`` in a page (e.g. its CSRF token)."""
    p = _Inputs()
    p.feed(html_text)
    return p.values.get(name)


class Client:
    """A browser-like HTTP client: keeps cookies, never follows redirects, 20 s timeout."""

    def __init__(self, base: str, ssl_context=None, headers: dict[str, str] | None = None) -> None:
        self.base = base
        self.headers = dict(headers or {})  # sent with every request (e.g. a proxy's X-Forwarded-For)
        self.jar = http.cookiejar.CookieJar()
        handlers = [urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect()]
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self.opener = urllib.request.build_opener(*handlers)

    def request(self, method: str, path: str, data: dict | list | None = None) -> Reply:
        body = urllib.parse.urlencode(data, doseq=True).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=self.headers)
        if body is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with self.opener.open(req, timeout=20) as r:
                return Reply(r.status, _headers(r.headers), r.read())
        except urllib.error.HTTPError as e:
            return Reply(e.code, _headers(e.headers), e.read())

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, path: str, data: dict | list) -> Reply:
        return self.request("POST", path, data)

    def login(self, name: str, password: str) -> Reply:
        token = hidden(self.get("/login").text, "csrf_token")
        return self.post("/login", {"username": name, "password": password, "csrf_token": token, "next": "/"})

    def csrf(self, path: str = "/") -> str:
        """The session's CSRF token, read from a page's forms."""
        token = hidden(self.get(path).text, "csrf_token")
        assert token, f"no csrf_token on {path}"
        return token


def node_config(root: Path, extra: str = "") -> Path:
    """A config for a database-only node (no daemon needed), upgraded."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "cxr-node.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{root / "data"}"\n{extra}')
    cli("db", "upgrade", config=cfg)
    return cfg
