"""Small helpers shared by scripts/demo.py and scripts/bench_propagation.py for driving
kv-node processes over their HTTP API.

`ask` and `form_cluster` follow the node's answers (examples/kv/src/api.rs): 2xx is done;
421 names the leader, so ask it; 503 means the same request may succeed soon (no leader yet,
a leader whose lease is not established, a membership change not committed yet), so ask
again; any other answer cannot change by asking again, so it fails at once with the node's
answer. `http` and `retry` are the older, simpler pair: retry anything until a deadline.
"""
import http.client
import json
import socket
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeError(Exception):
    """A node's non-2xx answer: the status and the body it sent (its `error` says why)."""

    def __init__(self, status, body):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


def _decode(raw):
    text = raw.decode(errors="replace")
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def request(addr, path, body=None, timeout=30):
    """GET (no body) or POST JSON to a node: (status, decoded JSON or text) for any answer.
    Raises OSError (or http.client.HTTPException) when the node does not answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{addr}{path}", data=data,
                                 headers={"content-type": "application/json"},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, _decode(r.read())
    except urllib.error.HTTPError as e:
        return e.code, _decode(e.read())


def http(addr, path, body=None, timeout=30):
    """GET (no body) or POST JSON to a node; returns the decoded JSON answer or None. Raises
    NodeError (with the node's body) for a non-2xx answer."""
    status, answer = request(addr, path, body, timeout)
    if not 200 <= status < 300:
        raise NodeError(status, json.dumps(answer) if isinstance(answer, (dict, list)) else answer)
    return answer


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


class Failed(Exception):
    """A step that failed: what, which node answered last and what it answered (None when
    it never answered). `sidecars` says the step was the sidecars' (their logs matter)."""

    def __init__(self, what, node=None, answer=None, sidecars=False):
        super().__init__(what)
        self.what, self.node, self.answer, self.sidecars = what, node, answer, sidecars


def describe(answer):
    """One line for an answer as `ask` records it: (status, body) or the exception."""
    if answer is None:
        return "no answer"
    if isinstance(answer, BaseException):
        return f"no answer ({type(answer).__name__}: {answer})"
    status, body = answer
    return f"HTTP {status} {json.dumps(body) if isinstance(body, (dict, list)) else body}"


def ask(nodes, via, path, body, what, timeout=30, idempotent=True, alive=None):
    """POSTs `body` to `path` at node `via`, following the cluster's answers (see the module
    doc) until one is 2xx; returns (the node that took it, its decoded answer).

    `nodes` maps node id to {"addr": ...}. A node that cannot be reached is asked again
    (every request here is idempotent) unless `idempotent` is false: then only a refused
    connection, which delivered nothing, is. `alive(id)` raises Failed for a node whose
    process has exited, so that a dead node fails the step at once. Raises Failed naming
    the node and its last answer when an answer is final or `timeout` seconds have passed.
    """
    deadline = time.time() + timeout
    node, last = via, None
    while True:
        if alive:
            alive(node)
        try:
            status, answer = request(nodes[node]["addr"], path, body, timeout=max(1, deadline - time.time()))
        except (OSError, http.client.HTTPException) as e:
            refused = isinstance(getattr(e, "reason", e), ConnectionRefusedError)
            if not idempotent and not refused:
                raise Failed(f"{what}: node {node} did not answer; the request may or may not "
                             "have taken effect", node, e)
            last = e
        else:
            last = (status, answer)
            if 200 <= status < 300:
                return node, answer
            leader = answer.get("leader_id") if isinstance(answer, dict) else None
            if status == 421 and leader in nodes and leader != node:
                node = leader
                continue
            if status not in (421, 503):
                raise Failed(f"{what}: node {node} refused", node, last)
        if time.time() >= deadline:
            raise Failed(f"{what}: gave up after {timeout}s", node, last)
        time.sleep(0.1)


def leader_of(nodes, via, alive=None, timeout=30):
    """The id of the leader as node `via` knows it (waits until it knows one)."""
    return wait_for(f"node {via} to know a leader",
                    lambda: http(nodes[via]["addr"], "/metrics").get("leader"),
                    nodes, via, timeout=timeout, alive=alive)


def wait_for(what, fn, nodes, node, timeout=30, alive=None, sidecars=False, show=None):
    """Polls fn() until it returns a true value, which it returns; an exception from fn is
    taken as "not yet". Raises Failed after `timeout` seconds, naming `node` with its last
    answer when fn's last call failed on one, and what `show()` says of the state then."""
    deadline = time.time() + timeout
    while True:
        if alive:
            alive(node)
        last = None
        try:
            result = fn()
            if result:
                return result
        except NodeError as e:
            last = (e.status, e.body)
        except Exception as e:  # not up yet, or the cluster is still settling
            last = e
        if time.time() >= deadline:
            seen = ""
            if show:
                try:
                    seen = f"; last seen: {show()}"
                except Exception as e:
                    seen = f"; cannot see it ({e})"
            raise Failed(f"timed out after {timeout}s waiting for {what}{seen}", node, last, sidecars)
        time.sleep(0.05)


def form_cluster(nodes, alive=None, timeout=30):
    """Makes a cluster of `nodes` (id -> {"addr": ...}): the lowest id initializes alone,
    adds the others as learners (each call waits until the learner has caught up) and makes
    them all voters. Follows the leader wherever it moves meanwhile. Returns the leader's id."""
    first = min(nodes)
    # Not idempotent: a second init of a node that took the first one is refused for good.
    ask(nodes, first, "/init", {}, f"node {first} to initialize", timeout, idempotent=False, alive=alive)
    via = first
    for i in sorted(nodes):
        if i != first:
            via, _ = ask(nodes, via, "/add-learner", {"id": i, "addr": nodes[i]["addr"]},
                         f"adding node {i} as a learner", timeout, alive=alive)
    via, _ = ask(nodes, via, "/change-membership", {"members": sorted(nodes)},
                 "making every node a voter", timeout, alive=alive)
    return via
