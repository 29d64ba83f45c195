"""Measures each function binary: size, and time from process start to its first poll of
the Lambda Runtime API (served here by a minimal local Runtime API that never answers the
poll), beside a probe that builds the same SDK and Stripe clients and nothing else
(shared/examples/coldstart_probe.rs), in the same run. Prints a Markdown table for
docs/performance.md.

Usage: python scripts/coldstart.py target/release [runs]
"""

import http.server
import os
import statistics
import subprocess
import sys
import threading
import time

FUNCTIONS = [
    "credits-api", "purchases", "stripe-webhook", "billing-events", "credit-refresh",
    "refunds", "refunds-worker", "support-intake", "support-forwarder",
]
PROBE = "examples/coldstart_probe"
ENV = {
    "TALLY_TABLE": "tally", "BILLING_EVENTS_QUEUE_URL": "http://127.0.0.1:9/queue",
    "NOTIFICATIONS_QUEUE_URL": "http://127.0.0.1:9/notifications",
    "STRIPE_WEBHOOK_SECRET": "whsec_x", "STRIPE_SECRET_KEY": "sk_test_x",
    "TALLY_APP_URL": "https://studio.example", "AWS_REGION": "us-east-1",
    "REFRESH_JOBS_QUEUE_URL": "http://127.0.0.1:9/refresh", "REFUNDS_QUEUE_URL": "http://127.0.0.1:9/refunds",
    "SUPPORT_QUEUE_URL": "http://127.0.0.1:9/tickets", "HELPDESK_WEBHOOK_URL": "https://helpdesk.example/tickets",
    "HELPDESK_WEBHOOK_SECRET": "x" * 32,
    "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
    "AWS_LAMBDA_FUNCTION_NAME": "fn", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
    "AWS_LAMBDA_FUNCTION_VERSION": "1", "AWS_LAMBDA_LOG_FORMAT": "JSON",
}

polled = threading.Event()


class RuntimeApi(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.endswith("/runtime/invocation/next"):
            polled.set()
            time.sleep(5)  # hold the long poll; the process is killed meanwhile

    def log_message(self, *args):
        pass


def main():
    target, runs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RuntimeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ, **ENV, AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{server.server_address[1]}")
    print("| binary | size | start to first poll (median of %d) | p90 | beyond the probe |" % runs)
    print("|---|---|---|---|---|")
    names = [PROBE] + FUNCTIONS
    times = {name: [] for name in names}

    def start(name):
        polled.clear()
        began = time.perf_counter()
        p = subprocess.Popen([os.path.join(target, name)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not polled.wait(10):
            p.kill()
            raise SystemExit(f"{name} never polled the runtime API")
        elapsed = (time.perf_counter() - began) * 1000
        p.kill()
        p.wait()
        return elapsed

    # One unrecorded start each (the binary into the page cache), then rounds in which
    # every binary starts once, in an order that rotates: the probe and the functions share
    # whatever else the machine is doing.
    for name in names:
        start(name)
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(start(name))
    probe = statistics.median(times[PROBE])
    for name in names:
        t = sorted(times[name])
        size = os.path.getsize(os.path.join(target, name)) / (1024 * 1024)
        median = statistics.median(t)
        label = "probe (same clients, nothing else)" if name == PROBE else name
        print(f"| {label} | {size:.1f} MiB | {median:.1f} ms | {t[int(len(t) * 0.9) - 1]:.1f} ms | {median - probe:+.1f} ms |")
    server.shutdown()


if __name__ == "__main__":
    main()
