"""Small helpers shared by scripts/demo.py and scripts/bench_propagation.py for driving
kv-node processes over their HTTP API."""
import json
import socket
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(addr, path, body=None, timeout=30):
    """GET (no body) or POST JSON to a node; returns the decoded JSON answer or None."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{addr}{path}", data=data,
                                 headers={"content-type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        text = r.read()
        return json.loads(text) if text else None


def retry(what, fn, timeout=30):
    """Calls fn until it returns something other than None/False, or gives up after timeout."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            result = fn()
            if result is not None and result is not False:
                return result
        except Exception as e:  # the cluster is still settling
            last = e
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what} ({last})")
