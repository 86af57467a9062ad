"""The demo upstream that ``make run`` starts beside the gateway (127.0.0.1:9001)."""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Demo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "message": "hello from the demo upstream",
                "path": self.path,
                "requestId": self.headers.get("X-Request-Id"),
                "forwardedFor": self.headers.get("X-Forwarded-For"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, fmt: str, *args) -> None:
        pass


def main() -> None:
    port = int(os.environ.get("DEMO_PORT", "9001"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Demo)
    server.daemon_threads = True
    print(f"demo upstream on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
