"""Steady load on the swarm from inside its network (stdlib only: it runs in the api image).

    python load.py URL SECONDS CLIENTS  -> one JSON line: sent, answered, statuses, versions
    (in order of sending, one entry per second), errors

Each client sends a review, waits for the answer, sends the next (closed loop). The first answer
is announced on stderr ("answering"), so that a caller acts on a load that is already running:
starting a container can take longer than any fixed sleep on a busy machine."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request

url, seconds, clients = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
body = json.dumps({"inputs": "A moving film with a dull middle hour."}).encode()
lock = threading.Lock()
sent = answered = 0
statuses: dict[str, int] = {}
errors: dict[str, int] = {}
versions: list[tuple[float, str]] = []
start = time.monotonic()
first_answer = threading.Event()


def client() -> None:
    global sent, answered
    while time.monotonic() - start < seconds:
        headers = {"content-type": "application/json"}
        request = urllib.request.Request(url, data=body, headers=headers)
        sent_at = time.monotonic() - start
        with lock:
            sent += 1
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, version = str(response.status), response.headers["x-model-version"]
                response.read()
        except urllib.error.HTTPError as exc:
            status, version = str(exc.code), exc.headers.get("x-model-version", "")
        except OSError as exc:
            with lock:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        with lock:
            answered += 1
            statuses[status] = statuses.get(status, 0) + 1
            versions.append((sent_at, version))
        if not first_answer.is_set():
            first_answer.set()
            print("answering", file=sys.stderr, flush=True)


threads = [threading.Thread(target=client) for _ in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
versions.sort()
by_second: dict[int, dict[str, int]] = {}
for at, version in versions:
    counts = by_second.setdefault(int(at), {})
    counts[version] = counts.get(version, 0) + 1
print(
    json.dumps(
        {
            "sent": sent,
            "answered": answered,
            "statuses": statuses,
            "errors": errors,
            "versions_by_second": by_second,
        }
    )
)
