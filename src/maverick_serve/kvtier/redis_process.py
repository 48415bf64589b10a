"""A throwaway `redis-server` on a free loopback port, for benchmarks and tests (no persistence).

It can be stopped and started again on the same port, so outages can be staged."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from maverick_serve.net import free_port


class RedisProcess:
    def __init__(
        self,
        workdir: Path,
        password: str | None = None,
        maxmemory: str | None = None,
        tls: bool = False,
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (bash scripts/setup.sh installs it)")
        self.port = free_port()
        self.workdir = Path(workdir)
        self.password = password
        self.maxmemory = maxmemory
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.workdir / "redis.sock"

    @property
    def cert_path(self) -> Path:
        return self.workdir / "tls-cert.pem"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:  # the self-signed certificate is its own CA
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.cert_path}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _make_certificate(self) -> list[str]:
        key = self.workdir / "tls-key.pem"
        if not self.cert_path.exists():
            openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
            subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
            files = ["-keyout", str(key), "-out", str(self.cert_path)]
            subprocess.run([*openssl, *files, *subject], check=True, capture_output=True)
        return [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.cert_path),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.cert_path),
            "--tls-auth-clients", "no",
        ]  # fmt: skip

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout_s: float = 10.0) -> None:
        cmd = [
            "redis-server",
            *(self._make_certificate() if self.tls else ["--port", str(self.port)]),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.maxmemory:
            cmd += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
