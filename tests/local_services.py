"""Real servers for the tests, each on 127.0.0.1 at a free port and stopped after
the test: a throwaway PostgreSQL cluster (the Debian package `postgresql`; .ci/run installs
it) and moto's S3-compatible server."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_system_package


def wait_for_http(proc, url: str, log: Path, within_s: float) -> None:
    """Until `url` answers; fails with the server's log if it exits or misses the deadline
    (a start-up deadline on busy cores, not a timing assertion)."""
    deadline = time.time() + within_s
    while True:
        assert proc.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            assert time.time() < deadline, f"no answer from {url} within {within_s}s:\n{log.read_text()[-3000:]}"
            time.sleep(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin(name: str) -> str:
    found = shutil.which(name) or max(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), default=None)
    require_system_package(bool(found), f"PostgreSQL's {name}", "postgresql")
    return found


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    db: str

    def env(self) -> dict[str, str]:
        """What deploy/dagster.yaml reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USER": self.user,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": self.db}

    def connect(self, db: str | None = None):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=db or self.db)


@pytest.fixture
def postgres():
    """A fresh cluster with a password-protected superuser and an empty database."""
    root = Path(tempfile.mkdtemp(prefix="crucible-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root; the cluster belongs to `postgres`
        shutil.chown(root, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    server = Postgres(host="127.0.0.1", port=free_port(), user="crucible", password=os.urandom(12).hex(), db="dagster")
    pwfile, data = root / "pw", root / "data"
    pwfile.write_text(server.password)
    if as_owner:
        shutil.chown(pwfile, "postgres")
    run = lambda *cmd: subprocess.run([*as_owner, *cmd], check=True, capture_output=True)  # noqa: E731
    run(postgres_bin("initdb"), "-D", str(data), "-U", server.user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
        "--no-sync")
    run(postgres_bin("pg_ctl"), "start", "-w", "-D", str(data), "-l", str(root / "log"),
        "-o", f"-h {server.host} -p {server.port} -k {root} -F")
    try:
        conn = server.connect("postgres")
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {server.db}")
        conn.close()
        yield server
    finally:
        subprocess.run([*as_owner, postgres_bin("pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3_url(monkeypatch):
    """moto's S3 server with one empty bucket; s3fs/botocore find it through the environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="crucible")
    try:
        yield "s3://crucible/store"
    finally:
        server.stop()
