"""Kills the local runner with SIGKILL while its billing worker is still applying Stripe
deliveries it has acknowledged, starts it again on the same data directory, and checks
that every purchase is credited exactly once: the local queues live in the embedded store,
and Stripe never resends a delivery that got a 2xx.

Usage: python scripts/crash_test.py path/to/tally-local
"""

import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from browser_test import call, dev_token, free_port, reachable, wait_until

PACKS = 20
CREDITS = 500


def start(binary: str, env: dict, base: str) -> subprocess.Popen:
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL)
    wait_until("the local runner", lambda: reachable(f"{base}/health"), timeout_s=60)
    return proc


def pay(url: str) -> int:
    """Presses Pay on the simulated checkout page: Stripe's events are delivered to the
    webhook and acknowledged before this returns; the billing worker applies them later."""
    req = urllib.request.Request(f"{url}/pay", data=b"", method="POST")
    req.add_header("Content-Type", "application/x-www-form-urlencoded")
    with urllib.request.urlopen(req, timeout=30) as res:
        return res.status


def main() -> None:
    binary = sys.argv[1]
    credited = 0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data_dir = tempfile.mkdtemp(prefix="tally-crash-")
    env = dict(os.environ, PORT=str(port), TALLY_DATA_DIR=data_dir,
               TALLY_DEV_JWT_SECRET="browser-test-secret", RUST_LOG="warn")
    env.pop("STRIPE_SECRET_KEY", None)
    owner = dev_token({"sub": "crash-owner", "org_id": "crash", "role": "owner",
                       "exp": int(time.time()) + 600})

    proc = start(binary, env, base)
    try:
        for _ in range(PACKS):
            status, session = call("POST", f"{base}/v1/checkout/sessions",
                                   {"kind": "pack", "pack": "pack_500"}, owner)
            assert status == 201, (status, session)
            assert pay(session["url"]) < 400
        # Every delivery is acknowledged; the worker is still at them. Kill it now.
        _, b = call("GET", f"{base}/v1/balance", token=owner)
        credited = b["available"] // CREDITS
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    proc = start(binary, env, base)
    try:
        def balance() -> int:
            status, b = call("GET", f"{base}/v1/balance", token=owner)
            assert status == 200, (status, b)
            return b["available"]

        wait_until("every purchase credited", lambda: balance() >= PACKS * CREDITS,
                   timeout_s=60)
        assert balance() == PACKS * CREDITS, balance()
        status, history = call("GET", f"{base}/v1/ledger?limit=100", token=owner)
        assert status == 200, history
        grants = [e for e in history["items"] if e["reason"] == "pack_purchase"]
        assert len(grants) == PACKS, [e["reason"] for e in history["items"]]
        print(f"crash test passed: {PACKS} purchases acknowledged, the runner killed with "
              f"SIGKILL when about {credited} were credited, each credited once after the "
              f"restart")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
