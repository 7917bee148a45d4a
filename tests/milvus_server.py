"""A Milvus standalone server for the tests: the ``milvus`` package's server binaries (embedded etcd,
local storage), started in a folder of its own on free loopback ports, and stopped however the
tests end.

The package fixes one port its embedded etcd listens on (the peer port, 2380) and picks the others
counting up from Milvus's defaults, so two servers started at once (two test sessions on a shared
machine) would take the same ports; here every port is one the system handed out as free, the etcd
ones through an etcd configuration of the server's own.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

# Seconds the server may take to answer its health check (about 15 s on 2 idle cores).
START_TIMEOUT = 120
# How often the query coordinator looks for sealed segments to serve and indexes to load: every
# second instead of Milvus 2.3's ten (UpdateNextTargetInterval) and one to three (its checkers), so
# a write job's wait for the query nodes to serve what it flushed takes about 2 s instead of 13.
# The store code waits the same way on any server; only the server answers sooner.
_QUERY_COORD_PACE = (
    "  UpdateNextTargetInterval: 1\n"
    "  checkSegmentInterval: 200\n"
    "  checkChannelInterval: 200\n"
    "  checkIndexInterval: 1000\n"
)
# Characters of the server's first error line kept in a failure message (why it did not start).
_REASON_CHARS = 300


def free_port() -> int:
    """A TCP port nothing listens on at the moment, on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MilvusTestServer:
    """One Milvus standalone server process tree, with its data under ``folder``.

    Attributes:
        folder: The server's data, configuration and logs.
        port: Its gRPC port on 127.0.0.1 (what ``milvus://127.0.0.1:PORT`` names).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self._server: Any = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, the server part of a store URI."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server process's id."""
        return int(self._server.server_proc.pid)

    def start(self) -> None:
        """Start the server and wait until it answers its health check and a client's connection.

        Raises:
            RuntimeError: it did not start; the message ends with its last log lines.
        """
        import milvus
        from pymilvus import MilvusClient

        self.folder.mkdir(parents=True, exist_ok=True)
        template = Path(milvus.__file__).parent / "data" / "config.yaml.template"
        text = template.read_text(encoding="utf-8")
        for section in ("\netcd:\n", "\nqueryCoord:\n"):
            if section not in text:
                raise RuntimeError(f"the milvus package's {template} has no {section.strip()} section")
        text = text.replace("\netcd:\n", "\netcd:\n  config:\n    path: {{ etcd_config_path }}\n", 1)
        own_template = self.folder / "milvus.yaml.template"
        pace = text.replace("\nqueryCoord:\n", f"\nqueryCoord:\n{_QUERY_COORD_PACE}", 1)
        own_template.write_text(pace, encoding="utf-8")
        client_port, peer_port = free_port(), free_port()
        etcd_config = self.folder / "etcd.yaml"
        etcd_config.write_text(
            "name: default\n"
            f"listen-peer-urls: http://127.0.0.1:{peer_port}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer_port}\n"
            f"listen-client-urls: http://127.0.0.1:{client_port}\n"
            f"advertise-client-urls: http://127.0.0.1:{client_port}\n"
            f"initial-cluster: default=http://127.0.0.1:{peer_port}\n",
            encoding="utf-8",
        )
        ports = {
            key: free_port()
            for key in milvus.MilvusServerConfig().configurable_items
            if key.endswith("_port")
        }
        ports.update(proxy_port=self.port, etcd_port=client_port)
        config = milvus.MilvusServerConfig(
            template=str(own_template), data_dir=str(self.folder / "data"), **ports
        )
        config.set("etcd_config_path", str(etcd_config))
        config.glog_conf_file = str(template.parent / "glog.conf")  # set only for the package's template
        self._server = milvus.MilvusServer(config, wait_for_started=False)
        self._server.webservice_port = free_port()  # its health check's (counted up from 9091 otherwise)
        try:
            self._server.start()
            self._server.wait_started(timeout=START_TIMEOUT * 1000)  # its /healthz answers OK
            MilvusClient(uri=f"http://{self.address}", timeout=30).close()
        except Exception as error:
            self.stop()
            raise RuntimeError(f"the Milvus server did not start ({error}): {self._first_error()}") from None

    def stop(self) -> None:
        """Stop the server (terminate, then kill after a second); safe to call twice."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def _first_error(self) -> str:
        """The server's first error line (its log is in ``folder``), shortened."""
        log = self.folder / "data" / "logs" / "milvus-stdout.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        first = next((line for line in lines if "[ERROR]" in line), None)
        return first[:_REASON_CHARS] if first else f"no error in its log ({log})"
