"""The local node's control API, for fault injection from the tests (`LocalNode` is its client): an HTTP
server on 127.0.0.1 at a free port, written to STATE/control-port once it listens.

    GET  /pods                                     what runs here: pods, netns, containers' pids, logs, states
    POST /kill {namespace, pod, container, signal} a signal to the container's PID 1 (default SIGKILL)
    POST /oom  {namespace, pod, container}         SIGKILL, reported as OOMKilled
    POST /lose                                     the node vanishes (NodeAgent.lose)

`container` may be null: the first running container of the pod. A pod or container not running: 404.
"""

from __future__ import annotations

import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import NodeAgent


def serve_control(node: NodeAgent) -> ThreadingHTTPServer:
    """Start the API in a thread; the caller shuts the returned server down."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.reply(200, node.describe() if self.path == "/pods" else {"name": node.name})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            try:
                if self.path == "/lose":
                    node.lose()
                    return self.reply(200, {"lost": node.name})
                c = node.find_container(body["namespace"], body["pod"], body.get("container"))
                if self.path == "/oom":
                    c.oom = True
                    c.signal(signal.SIGKILL)
                elif self.path == "/kill":
                    c.signal(int(body.get("signal", signal.SIGKILL)))
                else:
                    return self.reply(404, {"error": self.path})
                self.reply(200, {"pid": c.pid1})
            except KeyError as exc:
                self.reply(404, {"error": str(exc)})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="control").start()
    # Written whole, then renamed: LocalNode polls for the file and reads it at once.
    (node.state / "control-port.tmp").write_text(str(server.server_address[1]))
    (node.state / "control-port.tmp").rename(node.state / "control-port")
    return server
