"""What one webhook attempt costs the sending thread in CPU (app/webhooks/sender.py `send`, the SSRF guard included),
against a local receiver in another process (so its CPU is not counted), keep-alive as in a worker.

    .venv/bin/python ops/bench/sender_cost.py --attempts 1000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from ipaddress import ip_network
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.webhooks.sender import send  # noqa: E402

RECEIVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.webhook_receiver import WebhookReceiver
receiver = WebhookReceiver().start()
print(receiver.url, flush=True)
while True:
    time.sleep(0.5)
    receiver.requests.clear()
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--attempts", type=int, default=1000)
    args = parser.parse_args()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        url = receiver.stdout.readline().strip()
        body = b'{"type":"submission.completed","data":{"id":"sub_x","status":"completed"}}' * 4
        headers = {"webhook-id": "msg_1", "webhook-timestamp": "1", "webhook-signature": "v1," + "x" * 44}
        allowed = (ip_network("127.0.0.0/8"),)
        for _ in range(50):  # warm: connections open, caches filled
            send(url, body, headers, allowed=allowed, timeout=5, ports=None)
        began = time.thread_time()
        for _ in range(args.attempts):
            result = send(url, body, headers, allowed=allowed, timeout=5, ports=None)
            if not result.succeeded:
                print(f"attempt failed: {result}")
                return 1
        spent = time.thread_time() - began
        print(f"sender: {args.attempts} attempts, {1000 * spent / args.attempts:.3f} ms CPU per attempt "
              "(the sending thread)")
    finally:
        receiver.kill()
        receiver.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
