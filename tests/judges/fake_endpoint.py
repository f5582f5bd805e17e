"""A chat-completions server on 127.0.0.1 for the HTTP judge's tests (a real socket, a thread per request)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = "sk-test-secret-123"


class FakeEndpoint:
    """A chat-completions server: `script(body, n)` -> (status, payload, delay_s, headers); payload is a str (the
    answer, wrapped as a completion), bytes (sent as is) or a dict (sent as JSON)."""

    def __init__(self, script):
        self.script, self.requests, self.lock = script, [], threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    n = len(endpoint.requests)
                    endpoint.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                              "body": body})
                status, payload, delay, headers = endpoint.script(body, n)
                if delay:
                    time.sleep(delay)
                if isinstance(payload, str):
                    key = "message" if self.path.endswith("/chat/completions") else None
                    choice = {"message": {"role": "assistant", "content": payload}} if key else {"text": payload}
                    payload = {"id": "x", "choices": [{"index": 0, "finish_reason": "stop", **choice}]}
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
