#!/usr/bin/env python3
"""The demo chat's handlers as a plain HTTP backend (Python standard library only).

Switchboard POSTs each event of a topic bound in `gateway.http_handlers` here, as the JSON
envelope {"topic", "data", "context"} that NATS handlers get, signed with
`X-Switchboard-Signature: t=<unix>,id=<event id>,v1=<hex HMAC-SHA256 of "<t>.<id>.<body>">`.
This backend checks the signature (refusing a request older than five minutes), answers
{"reply": P}, {"fail": E} or {}, and reaches sockets through the gateway's server API
(POST /api/broadcast, /api/send, GET /api/presence), as any backend in any language can.

    SWITCHBOARD_HANDLER_SECRET=... SWITCHBOARD_API_KEY=... \
        python3 backend.py --listen 127.0.0.1:8081 --api http://127.0.0.1:4002

It prints `ready <port>` once it listens. The wire contract is docs/PROTOCOL.md,
"Handlers over HTTP".
"""

import argparse
import hashlib
import hmac
import json
import os
import sys
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Used when the variables are unset, as `switchboard serve --demo` does. Never in production.
DEMO_HANDLER_SECRET = "switchboard-demo-handler-secret-not-for-production"
DEMO_API_KEY = "switchboard-demo-api-key-not-for-production"

MAX_BODY = 1 << 20  # what one event may bring: the gateway bounds messages far below this
TOLERANCE = 300  # seconds between the signature's t and our clock
MAX_TEXT = 2000


def verify(secret: bytes, header: str, body: bytes, now: float) -> bool:
    """The signature check every backend does (the same as switchboard_http_handlers::verify)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        t = int(fields["t"])
        event_id = fields["id"]
        v1 = fields["v1"]
    except (KeyError, ValueError):
        return False
    if abs(now - t) > TOLERANCE:
        return False
    expected = hmac.new(secret, f"{t}.{event_id}.".encode() + body, hashlib.sha256).hexdigest()
    # Bytes, not str: compare_digest refuses str with non-ASCII characters, and the header
    # is the sender's to choose.
    return hmac.compare_digest(expected.encode(), v1.encode("latin-1", "replace"))


class Chat:
    """The demo chat (crates/switchboard-server/src/demo.rs), over the server API."""

    def __init__(self, api: str, key: str):
        self.api = api.rstrip("/")
        self.key = key

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.api + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read(MAX_BODY) or b"null")

    def online(self, namespace: str):
        query = urllib.parse.urlencode({"namespace": namespace})
        p = self.call("GET", f"/api/presence?{query}")
        return p["sockets"], sorted(p["users"])

    def tell_presence(self, namespace: str):
        count, users = self.online(namespace)
        self.call("POST", "/api/broadcast", {
            "namespace": namespace,
            "type": "chat.presence",
            "payload": {"online": count, "users": users},
        })

    def handle(self, event):
        """The answer to one event, and what to do once it is sent."""
        topic, data, ctx = event["topic"], event.get("data") or {}, event.get("context") or {}
        user, namespace = ctx.get("username"), ctx.get("namespace")
        if topic == "socket:connection":
            if not namespace:
                return {"fail": {"message": "pick a namespace: connect with ?namespace=NAME"}}, None
            count, users = self.online(namespace)
            answer = {"reply": {"username": user, "namespace": namespace, "online": count,
                                "users": users, "handled_by": "python"}}
            return answer, lambda: self.tell_presence(namespace)
        if topic == "socket:close":
            return {}, (lambda: self.tell_presence(namespace)) if namespace else None
        payload = data.get("payload") if isinstance(data.get("payload"), dict) else {}
        text = payload.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT or not namespace:
            return {"fail": {"message": f"{data.get('type')} needs payload.text (1 to {MAX_TEXT} bytes)"}}, None
        if topic == "chat:say":
            self.call("POST", "/api/broadcast", {
                "namespace": namespace, "type": "chat.said",
                "payload": {"from": user, "text": text},
            })
            return {}, None
        if topic == "chat:whisper":
            to = payload.get("to")
            if not isinstance(to, str) or not to:
                return {"fail": {"message": "chat.whisper needs payload.to and payload.text"}}, None
            for recipient in dict.fromkeys([to, user]):
                self.call("POST", "/api/send", {
                    "username": recipient, "namespace": namespace, "type": "chat.whispered",
                    "payload": {"from": user, "text": text, "to": to},
                })
            return {}, None
        return {}, None


def make_handler(secret: bytes, chat: Chat):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the gateway reuses its connections

        def answer(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                # Said, so that the gateway does not send its next event on this connection.
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        # A client that stalls is dropped, so it cannot hold a thread forever.
        timeout = 30

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self.close_connection = True
                return self.answer(413, {"error": "missing, bad or too large Content-Length"})
            body = self.rfile.read(length)
            signature = self.headers.get("X-Switchboard-Signature", "")
            if not verify(secret, signature, body, time.time()):
                return self.answer(401, {"error": "bad signature"})
            try:
                answer, after = chat.handle(json.loads(body))
            except Exception as e:  # a failing handler: the socket gets an error frame
                print(f"handler failed: {e!r}", file=sys.stderr, flush=True)
                return self.answer(500, {"error": "handler failed"})
            if after:
                # The follow-up runs on this connection's thread after the answer; the gateway
                # must not send its next event here meanwhile, so this connection ends.
                self.close_connection = True
            self.answer(200, answer)
            if after:  # after the answer: the socket hears its reply first
                try:
                    after()
                except Exception as e:
                    print(f"follow-up failed: {e!r}", file=sys.stderr, flush=True)

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8081", help="host:port (port 0: any)")
    parser.add_argument("--api", default="http://127.0.0.1:4002", help="the gateway's server API")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="fall back to the demo's public secret and API key when the variables are unset",
    )
    args = parser.parse_args()
    secret = os.environ.get("SWITCHBOARD_HANDLER_SECRET")
    key = os.environ.get("SWITCHBOARD_API_KEY")
    if not (secret and key):
        if not args.demo:
            sys.exit(
                "backend: set SWITCHBOARD_HANDLER_SECRET and SWITCHBOARD_API_KEY "
                "(or pass --demo to use the demo's public ones)"
            )
        print("backend: using the demo secret or API key (never in production)", file=sys.stderr)
        secret = secret or DEMO_HANDLER_SECRET
        key = key or DEMO_API_KEY
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), make_handler(secret.encode(), Chat(args.api, key)))
    server.daemon_threads = True
    print(f"ready {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
