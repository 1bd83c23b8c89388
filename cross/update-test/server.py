#!/usr/bin/env python3
"""The update test's file server, outside the emulated Pi: GET /<name> from DIR with
`Range: bytes=N-`, and misbehaviour on demand. Python's http.server has no Range.

    server.py DIR PORT CONTROL LOG

CONTROL (JSON, read at each request) may hold "cut_after" (bytes) with "cuts" (how many
requests to cut after that many body bytes; decremented) and "rate" (bytes a second; 0: as
fast as possible). LOG gets one JSON line per request: path, range start, bytes sent, cut.
"""
import json
import os
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

DIR, PORT, CONTROL, LOG = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lock = threading.Lock()


def control():
    try:
        with open(CONTROL) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def take_cut():
    """The cut for this request, if one is left (the control file's count goes down)."""
    with lock:
        c = control()
        if c.get("cuts", 0) <= 0:
            return None, c.get("rate", 0)
        c["cuts"] -= 1
        with open(CONTROL + ".new", "w") as f:
            json.dump(c, f)
        os.replace(CONTROL + ".new", CONTROL)
        return c["cut_after"], c.get("rate", 0)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = os.path.join(DIR, os.path.basename(self.path.split("?")[0]))
        try:
            with open(path, "rb") as f:
                body = f.read()
        except OSError:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        r = self.headers.get("Range", "")
        if r.startswith("bytes=") and r.endswith("-"):
            start = int(r[6:-1])
        if start >= len(body) and start > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Connection", "close")
        self.end_headers()
        cut, rate = take_cut()
        rest = body[start:] if cut is None else body[start : start + cut]
        sent = 0
        chunk = 8192
        began = time.monotonic()
        try:
            while sent < len(rest):
                self.wfile.write(rest[sent : sent + chunk])
                sent += len(rest[sent : sent + chunk])
                if rate:
                    ahead = sent / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
            self.wfile.flush()
        except OSError:
            pass
        with lock, open(LOG, "a") as f:
            f.write(json.dumps({"path": self.path, "start": start, "sent": sent, "cut": cut is not None}) + "\n")
        self.close_connection = True


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


Server(("127.0.0.1", PORT), Handler).serve_forever()
