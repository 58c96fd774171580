"""Shared fixtures: the real daemon as a subprocess on a free port, real dcmtk tools, real films.

A test that needs a Debian tool skips with the package name on a developer's machine and fails
under CI (CI=true), where `make test` installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def require_tool(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path:
        return path
    msg = f"{tool} not found: install the Debian package {package} (make test does this as root)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def wait_until(predicate, timeout: float, what: str, node=None, poll: float = 0.4):
    """``predicate()``'s first truthy value within ``timeout`` s, else TimeoutError naming ``what``
    (with the end of ``node``'s log when given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(poll)
    raise TimeoutError(f"{what} within {timeout}s" + (f"; log:\n{node.log[-4000:]}" if node else ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def cli(*args: str, config: Path | None = None, timeout: float = 60, check: bool = True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "cxr_node"] + (["--config", str(config)] if config else []) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


class Node:
    """One `cxr-node serve` subprocess with its own config, data dir and log."""

    def __init__(self, root: Path, *, ae_title: str = "CXRNODE", quiet_seconds: float = 30,
                 extra_node: str = "", extra: str = "", db_url: str | None = None, port: int | None = None,
                 log_level: str = "INFO", study_extra: str = "") -> None:
        self.root = root
        self.port = port or free_port()
        self.ae_title = ae_title
        self.log_level = log_level
        self.data_dir = root / "data"
        self.config = root / "cxr-node.toml"
        self.log_path = root / "cxr-node.log"
        root.mkdir(parents=True, exist_ok=True)
        db = f'\n[database]\nurl = "{db_url}"\n' if db_url else ""
        self.config.write_text(
            f'[node]\nae_title = "{ae_title}"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f"drain_seconds = 20\n{extra_node}\n"
            f'[storage]\ndata_dir = "{self.data_dir}"\n{db}'
            f"[study]\nquiet_seconds = {quiet_seconds}\n{study_extra}\n[logging]\nlevel = \"{log_level}\"\n{extra}\n"
        )
        self.proc: subprocess.Popen | None = None

    def upgrade(self) -> None:
        cli("db", "upgrade", config=self.config)

    def start(self, prefix: list[str] | None = None, upgrade: bool = True) -> "Node":
        if upgrade:
            self.upgrade()
        self._log = open(self.log_path, "ab")
        started = self.log.count(self.READY)
        cmd = (prefix or []) + [PY, "-m", "cxr_node", "--config", str(self.config), "serve"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_port(self.port, proc=self.proc)
        if self.log_level in ("DEBUG", "INFO"):  # the line is INFO: quieter nodes (benchmarks) just wait for the port
            self.wait_log(self.READY, count=started + 1)  # the port is bound before start-up recovery ends
        return self

    #: What `serve` logs once it has recovered the spool and accepts associations.
    READY = " listening as "

    def wait_log(self, text: str, timeout: float = 30, count: int = 1) -> None:
        """Wait until ``text`` appears ``count`` times in the log (which spans restarts)."""
        deadline = time.monotonic() + timeout
        while self.log.count(text) < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"cxr-node exited with {self.proc.returncode}; log:\n{self.log[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged within {timeout}s; log:\n{self.log[-3000:]}")
            time.sleep(0.05)

    def rss_kib(self) -> int:
        """The daemon's resident set size (VmRSS in /proc/PID/status), in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def audit(self, *args: str) -> list[dict]:
        return json.loads(cli("audit", "--format", "json", *args, config=self.config).stdout)

    def events(self, event: str, **match) -> list[dict]:
        return [r for r in self.audit("--event", event) if all(r.get(k) == v for k, v in match.items())]

    def wait_for_event(self, event: str, timeout: float = 20, **match) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.events(event, **match)
            if rows:
                return rows
            time.sleep(0.3)
        raise TimeoutError(f"no {event} {match} within {timeout}s; log:\n{self.log[-3000:]}")

    def spool_files(self) -> list[Path]:
        return sorted((self.data_dir / "spool").rglob("*")) if (self.data_dir / "spool").exists() else []

    def db(self):
        import sqlite3

        return sqlite3.connect(self.data_dir / "cxr-node.db")


@pytest.fixture
def node_factory(tmp_path):
    nodes: list[Node] = []

    def make(name: str = "node", **kw) -> Node:
        n = Node(tmp_path / name, **kw)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        if n.proc and n.proc.poll() is None:
            n.proc.kill()
            n.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def films() -> dict[str, Path]:
    """Real CR chest films (and the tibia control) from the PyPI package pydicom-data."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover
        pytest.skip("pydicom not installed")
    out = {}
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_J2KI.dcm"):
        p = get_testdata_file(name)
        if p is None:
            msg = f"{name} not found: pip install pydicom-data (the test extra)"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(msg)
            pytest.skip(msg)
        out[name.removesuffix(".dcm")] = Path(p)
    return out


def storescu(port: int, *files: Path, aet: str = "MODALITY", aec: str = "CXRNODE", args: tuple = (),
             timeout: float = 120) -> subprocess.CompletedProcess:
    exe = require_tool("storescu", "dcmtk")
    return subprocess.run([exe, "-v", "-aet", aet, "-aec", aec, *args, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=timeout)


def scu_store(port: int, path: Path, aec: str = "CXRNODE", sop_class: str | None = None, priority: int = 2):
    """Send a file by path with a pynetdicom SCU, chunked so its bytes go out exactly as they are on
    disk; returns the C-STORE response (Status, ErrorComment). ``priority``: the request's DIMSE
    Priority (2 LOW, pynetdicom's default; 0 MEDIUM; 1 HIGH)."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(sop_class or ComputedRadiographyImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=aec)
        assert assoc.is_established, "association should be accepted"
        try:
            return assoc.send_c_store(path, priority=priority)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def echoscu(port: int, aet: str = "MODALITY", aec: str = "CXRNODE", timeout: float = 30) -> subprocess.CompletedProcess:
    exe = require_tool("echoscu", "dcmtk")
    return subprocess.run([exe, "-aet", aet, "-aec", aec, "-to", "10", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=timeout)


class StoreSCP:
    """dcmtk storescp writing exactly what it receives (-B, bit-preserving) into a directory."""

    def __init__(self, out_dir: Path, port: int | None = None, ae_title: str = "STORESCP") -> None:
        self.exe = require_tool("storescp", "dcmtk")
        self.port = port or free_port()
        self.ae_title = ae_title
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "StoreSCP":
        self.proc = subprocess.Popen([self.exe, "-B", "+xa", "-aet", self.ae_title, "--max-pdu", "131072",
                                      "-od", str(self.out_dir), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Orthanc:
    """A real Orthanc (Debian package) as the PACS, on free ports, with its own storage; with
    ``dicomweb=True`` its DICOMweb plugin (Debian orthanc-dicomweb) serves ``/dicom-web/``."""

    DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

    def __init__(self, root: Path, dicom_port: int | None = None, http_port: int | None = None,
                 modalities: dict | None = None, dicomweb: bool = False) -> None:
        self.exe = require_tool("Orthanc", "orthanc")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self._ports_given = dicom_port is not None or http_port is not None
        self.ae_title = "ORTHANC"
        self.config = root / "orthanc.json"
        self._modalities, self._dicomweb = modalities, dicomweb
        self._write_config()
        if dicomweb and not Path(self.DICOMWEB_PLUGIN).is_file():
            if os.environ.get("CI") == "true":
                pytest.fail("Orthanc's DICOMweb plugin missing: apt-get install orthanc-dicomweb")
            pytest.skip("Orthanc's DICOMweb plugin missing (Debian package orthanc-dicomweb)")
        self.proc: subprocess.Popen | None = None

    def _write_config(self) -> None:
        root, modalities, dicomweb = self.root, self._modalities, self._dicomweb
        self.config.write_text(json.dumps({
            "Name": "cxr-node-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "Plugins": [], "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomAet": self.ae_title, "DicomPort": self.dicom_port, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "DicomModalities": modalities or {},
            "DicomAssociationCloseDelay": 0, "SaveJobs": False, "HttpBindAddress": "127.0.0.1",
            **({"Plugins": [self.DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
               if dicomweb else {}),
        }))

    def start(self) -> "Orthanc":
        """Start it; a free port that another test process took meanwhile (two xdist workers pick ports
        at the same time) gets new free ports and another start, at most three times."""
        for attempt in range(3):
            self._log = open(self.root / "orthanc.log", "ab")
            self.proc = subprocess.Popen([self.exe, str(self.config)], stdout=self._log, stderr=subprocess.STDOUT)
            try:
                wait_port(self.http_port, proc=self.proc)
                wait_port(self.dicom_port, proc=self.proc)
                return self
            except RuntimeError:
                self._log.close()
                in_use = b"already in use" in (self.root / "orthanc.log").read_bytes()[-4000:]
                if self._ports_given or not in_use or attempt == 2:
                    raise
                self.dicom_port, self.http_port = free_port(), free_port()
                self._write_config()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self._log.close()

    def rest(self, method: str, path: str, body: bytes | dict | None = None, timeout: float = 60):
        import urllib.request

        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return json.loads(raw) if r.headers.get_content_type() == "application/json" else raw

    def upload(self, path: Path) -> str:
        return self.rest("POST", "/instances", path.read_bytes())["ID"]

    def find(self, **query) -> list[dict]:
        return self.rest("POST", "/tools/find", {"Level": "Instance", "Query": query, "Expand": True})

    def file(self, instance_id: str) -> bytes:
        return self.rest("GET", f"/instances/{instance_id}/file")


@pytest.fixture
def orthanc_factory(tmp_path):
    made: list[Orthanc] = []

    def make(name: str = "orthanc", **kw) -> Orthanc:
        o = Orthanc(tmp_path / name, **kw)
        made.append(o)
        return o

    yield make
    for o in made:
        o.stop()


class Postgres:
    """A real PostgreSQL (Debian package) in a temporary directory, on 127.0.0.1 at a free port.
    As root it runs as the postgres user (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        import glob
        import tempfile

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            require_tool("postgresql-initdb-missing", "postgresql")
        self.bin = Path(bins[-1]).parent
        try:
            import psycopg  # noqa: F401
        except ImportError:
            msg = "psycopg not installed: pip install '.[test]'"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(msg)
            pytest.skip(msg)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="cxr-pg-", dir="/tmp"))  # pytest's tmp is not traversable by postgres
        self.data = self.root / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        subprocess.run(self.as_user + list(cmd), check=True, capture_output=True, text=True, timeout=timeout)

    def start(self) -> "Postgres":
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}", "start")
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "cxr")
        return self

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/cxr"

    def new_database(self, name: str) -> str:
        """A fresh, empty database on this server (tests that must not see other tests' rows)."""
        self.psql(f"create database {name}")
        return self.url.rsplit("/", 1)[0] + "/" + name

    def halt(self) -> None:
        """Stop the server but keep its data: a database outage, to be ended by :meth:`resume`."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)

    def resume(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}", "start")

    def psql(self, sql: str) -> str:
        p = subprocess.run([str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                            "-d", "cxr", "-At", "-c", sql], capture_output=True, text=True, timeout=60, check=True)
        return p.stdout

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    pg = Postgres().start()
    yield pg
    pg.stop()
