"""Browser test of the simulated Stripe checkout: a real headless Chromium opens the
checkout page served by the local runner and clicks Pay; the pack's credits must then
appear on the balance, exactly once.

Usage: python scripts/browser_test.py path/to/tally-local
Drives Chromium through ChromeDriver's WebDriver HTTP API with the standard library only.
"""

import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

DEV_SECRET = "browser-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def dev_token(claims: dict) -> str:
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(DEV_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def call(method: str, url: str, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_until(what: str, check, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
        return True
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def main() -> None:
    binary = sys.argv[1]
    app_port, driver_port = free_port(), free_port()
    base = f"http://127.0.0.1:{app_port}"
    data_dir = tempfile.mkdtemp(prefix="tally-browser-")
    env = dict(os.environ, PORT=str(app_port), TALLY_DATA_DIR=data_dir,
               TALLY_DEV_JWT_SECRET=DEV_SECRET, RUST_LOG="warn")
    env.pop("STRIPE_SECRET_KEY", None)
    procs = []
    try:
        procs.append(subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["chromedriver", f"--port={driver_port}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until("the local runner", lambda: reachable(f"{base}/health"))
        driver = f"http://127.0.0.1:{driver_port}"
        wait_until("chromedriver", lambda: reachable(f"{driver}/status"))

        owner = dev_token({"sub": "browser-owner", "org_id": "browser", "role": "owner",
                           "exp": int(time.time()) + 600})
        status, session = call("POST", f"{base}/v1/checkout/sessions",
                               {"kind": "pack", "pack": "pack_500"}, owner)
        assert status == 201, (status, session)
        status, balance = call("GET", f"{base}/v1/balance", token=owner)
        assert balance["available"] == 0, balance

        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tempfile.mkdtemp(prefix='tally-chromium-')}"]}}}}
        status, created = call("POST", f"{driver}/session", caps)
        assert status == 200, created
        sid = created["value"]["sessionId"]
        wd = f"{driver}/session/{sid}"
        try:
            call("POST", f"{wd}/url", {"url": session["url"]})
            status, found = call("POST", f"{wd}/element", {"using": "css selector", "value": "#pay"})
            assert status == 200, found
            element = next(iter(found["value"].values()))
            status, _ = call("GET", f"{wd}/element/{element}/text")
            call("POST", f"{wd}/element/{element}/click", {})
            wait_until("the payment-complete page", lambda: call(
                "POST", f"{wd}/element", {"using": "css selector", "value": "#done"})[0] == 200)
        finally:
            call("DELETE", wd)

        def credited():
            _, b = call("GET", f"{base}/v1/balance", token=owner)
            return b["available"] == 500
        wait_until("the pack's credits", credited)
        _, events = call("GET", f"{base}/sim/events")
        kinds = [e["type"] for e in events]
        # The charge and its payment intent, Checkout's invoice for the payment (neither
        # grants anything), the session.
        assert kinds == ["charge.succeeded", "payment_intent.succeeded", "invoice.finalized",
                         "invoice.paid", "invoice_payment.paid",
                         "checkout.session.completed"], kinds
        _, b = call("GET", f"{base}/v1/balance", token=owner)
        assert b["available"] == 500, b
        print("browser test passed: Pay clicked in Chromium, 500 credits granted once, invoiced")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


if __name__ == "__main__":
    main()
