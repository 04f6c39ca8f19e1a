"""kv-server: a replicated key-value store over HTTP (Python stdlib only).

    kv-server --config /var/vcap/jobs/kv/config/config.json

config.json: {"address", "port", "data_dir", "peers": ["host:port", ...],
"replication_timeout_ms", "tls": {"certificate_file", "key_file", "ca_file"}}.
With "tls" it serves HTTPS, and talks HTTPS to its peers, verifying their
certificates against ca_file (by chain: peers are dialed by IP).

API:
  PUT  /kv/<key>     store the body durably, replicate it synchronously to
                     every peer, answer 201 (new key) or 204 (overwritten).
                     Peers that fail are queued and retried in the background.
                     With header X-Kv-Replica: 1 the write is stored only.
  GET  /kv/<key>     200 with the value, or 404.
  GET  /kv           200 with a JSON list of keys.
  GET  /health       200 "ok".
  POST /admin/flush  wait until the retry queue is empty (at most 30 s), then
                     200 with the number of replications still pending.

On startup it pulls the keys it lacks from the first reachable peer, so a
recreated instance catches up. Logs go to stderr. SIGTERM stops it cleanly.
"""

import argparse
import http.client
import json
import signal
import ssl
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

from kvstore import InvalidKey, KeyStore

REPLICA_HEADER = "X-Kv-Replica"
FLUSH_TIMEOUT_S = 30.0
MAX_BODY = 64 * 1024 * 1024


def log(msg):
    sys.stderr.write("%s kv-server: %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), msg))
    sys.stderr.flush()


def split_addr(addr):
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ValueError("peer %r is not host:port" % addr)
    return host.strip("[]"), int(port)


# TLS context for requests to peers (None: plain HTTP).
PEER_TLS = None


def request(peer, method, path, body=None, headers=None, timeout=2.0):
    """One HTTP request to a peer -> (status, body bytes). Raises on network errors."""
    host, port = split_addr(peer)
    if PEER_TLS is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=PEER_TLS)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Replicator:
    """Synchronous replication plus a background retry queue per peer."""

    def __init__(self, store, peers, timeout_s):
        self.store = store
        self.peers = list(peers)
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._pending = {p: set() for p in self.peers}  # peer -> keys to resend
        self._next_try = {p: 0.0 for p in self.peers}
        # Writes and resends of one key are serialised so a peer never gets
        # an older value after a newer one from this instance.
        self._key_locks = [threading.Lock() for _ in range(64)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._retry_loop, name="retry", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def key_lock(self, key):
        return self._key_locks[zlib.crc32(key.encode("utf-8")) % len(self._key_locks)]

    def send(self, peer, key, value):
        status, _ = request(
            peer, "PUT", "/kv/" + quote(key, safe=""), body=value,
            headers={REPLICA_HEADER: "1", "Content-Length": str(len(value))},
            timeout=self.timeout_s,
        )
        if status not in (200, 201, 204):
            raise IOError("peer answered %d" % status)

    def replicate(self, key, value):
        """Send to every peer in parallel; queue the ones that fail. Caller holds key_lock(key)."""
        failed = []
        threads = []

        def one(peer):
            try:
                self.send(peer, key, value)
            except Exception as e:  # any failure: retry later
                log("replicating %r to %s failed (%s); queued for retry" % (key, peer, e))
                failed.append(peer)

        for peer in self.peers:
            t = threading.Thread(target=one, args=(peer,), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        if failed:
            with self._cond:
                for peer in failed:
                    self._pending[peer].add(key)
                self._cond.notify_all()

    def pending_count(self):
        with self._cond:
            return sum(len(k) for k in self._pending.values())

    def flush(self, timeout_s):
        """Wait until nothing is pending or timeout; return the number left."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            for p in self.peers:
                self._next_try[p] = 0.0  # retry now
            self._cond.notify_all()
            while True:
                left = sum(len(k) for k in self._pending.values())
                remaining = deadline - time.monotonic()
                if left == 0 or remaining <= 0:
                    return left
                self._cond.wait(min(remaining, 0.5))

    def _retry_loop(self):
        while not self._stop.is_set():
            with self._cond:
                now = time.monotonic()
                due = [(p, sorted(k)) for p, k in self._pending.items() if k and self._next_try[p] <= now]
                if not due:
                    self._cond.wait(0.5)
                    continue
            for peer, keys in due:
                self._retry_peer(peer, keys)

    def _retry_peer(self, peer, keys):
        for key in keys:
            if self._stop.is_set():
                return
            with self.key_lock(key):
                value = self.store.get(key)
                try:
                    if value is not None:
                        self.send(peer, key, value)
                except Exception as e:
                    with self._cond:
                        self._next_try[peer] = time.monotonic() + 1.0
                    log("retry of %r to %s failed (%s)" % (key, peer, e))
                    return
                with self._cond:
                    self._pending[peer].discard(key)
                    self._cond.notify_all()
        log("retries to %s delivered" % peer)


def catch_up(store, peers, timeout_s):
    """Copy the keys this instance lacks from the first reachable peer."""
    for peer in peers:
        try:
            status, body = request(peer, "GET", "/kv", timeout=timeout_s)
            if status != 200:
                raise IOError("GET /kv answered %d" % status)
            keys = json.loads(body.decode("utf-8"))
        except Exception as e:
            log("catch-up: peer %s unreachable (%s)" % (peer, e))
            continue
        copied = 0
        for key in keys:
            if store.has(key):
                continue
            try:
                status, value = request(peer, "GET", "/kv/" + quote(key, safe=""), timeout=timeout_s)
            except Exception as e:
                log("catch-up: fetching %r from %s failed (%s)" % (key, peer, e))
                continue
            if status == 200:
                store.put(key, value)
                copied += 1
        log("catch-up: copied %d of %d key(s) from %s" % (copied, len(keys), peer))
        return
    if peers:
        log("catch-up: no peer reachable; starting with local data only")


class Handler(BaseHTTPRequestHandler):
    server_version = "kv-server/1"
    protocol_version = "HTTP/1.1"

    # set on the class by main()
    store = None
    replicator = None

    def log_message(self, fmt, *args):
        log("%s %s" % (self.address_string(), fmt % args))

    def _reply(self, status, body=b"", content_type="text/plain; charset=utf-8"):
        try:
            self.send_response(status)
            if status != 204:
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and status != 204:
                self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as e:
            log("client %s went away: %s" % (self.address_string(), e))
            self.close_connection = True

    def _key(self):
        path = urlsplit(self.path).path
        if not path.startswith("/kv/"):
            return None
        return unquote(path[len("/kv/"):])

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/health":
            return self._reply(200, b"ok")
        if path in ("/kv", "/kv/"):
            body = json.dumps(self.store.keys()).encode("utf-8")
            return self._reply(200, body, "application/json")
        key = self._key()
        if key is None:
            return self._reply(404, b"not found\n")
        try:
            value = self.store.get(key)
        except InvalidKey as e:
            return self._reply(400, (str(e) + "\n").encode())
        if value is None:
            return self._reply(404, b"no such key\n")
        return self._reply(200, value, "application/octet-stream")

    def do_PUT(self):
        key = self._key()
        if key is None:
            return self._reply(404, b"not found\n")
        length = self.headers.get("Content-Length")
        if length is None:
            return self._reply(411, b"Content-Length required\n")
        try:
            n = int(length)
        except ValueError:
            return self._reply(400, b"bad Content-Length\n")
        if n < 0 or n > MAX_BODY:
            return self._reply(413, b"body too large\n")
        value = self.rfile.read(n)
        if len(value) != n:
            return self._reply(400, b"short body\n")
        try:
            if self.headers.get(REPLICA_HEADER) == "1":
                created = self.store.put(key, value)
            else:
                with self.replicator.key_lock(key):
                    created = self.store.put(key, value)
                    self.replicator.replicate(key, value)
        except InvalidKey as e:
            return self._reply(400, (str(e) + "\n").encode())
        return self._reply(201 if created else 204, b"created\n" if created else b"")

    def do_POST(self):
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if path == "/admin/flush":
            left = self.replicator.flush(FLUSH_TIMEOUT_S)
            return self._reply(200, ("%d\n" % left).encode())
        return self._reply(404, b"not found\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description="replicated key-value server")
    parser.add_argument("--config", required=True, help="path to config.json")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)

    address = cfg.get("address") or "0.0.0.0"
    port = int(cfg["port"])
    peers = [str(p) for p in cfg.get("peers") or []]
    for p in peers:
        split_addr(p)  # fail early on a malformed peer
    timeout_s = max(0.05, float(cfg.get("replication_timeout_ms", 2000)) / 1000.0)

    global PEER_TLS
    tls = cfg.get("tls") or {}
    server_tls = None
    if tls:
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(tls["certificate_file"], tls["key_file"])
        if tls.get("ca_file"):
            PEER_TLS = ssl.create_default_context(cafile=tls["ca_file"])
            PEER_TLS.check_hostname = False  # peers are dialed by IP; the chain is verified
        else:
            PEER_TLS = ssl._create_unverified_context()

    store = KeyStore(cfg["data_dir"])
    log("data in %s, %d key(s); peers: %s" % (store.data_dir, len(store.keys()), ", ".join(peers) or "none"))
    catch_up(store, peers, max(timeout_s, 5.0))

    replicator = Replicator(store, peers, timeout_s)
    Handler.store = store
    Handler.replicator = replicator
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer((address, port), Handler)
    if server_tls is not None:
        server.socket = server_tls.wrap_socket(server.socket, server_side=True)
    replicator.start()

    def on_term(signum, _frame):
        log("signal %d: shutting down" % signum)
        replicator.stop()
        # shutdown() waits for serve_forever to return: call it off this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log("listening on %s:%d (%s)" % (address, port, "https" if server_tls else "http"))
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        left = replicator.pending_count()
        if left:
            log("stopped with %d replication(s) still pending" % left)
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
