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
    target, runs = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RuntimeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ, **ENV, AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{server.server_address[1]}")
    print("| binary | size | start to first poll (median of %d) | p90 | beyond the probe |" % runs)
    print("|---|---|---|---|---|")
    probe = None
    for name in [PROBE] + FUNCTIONS:
        path = os.path.join(target, name)
        times = []
        for _ in range(runs):
            polled.clear()
            start = time.perf_counter()
            p = subprocess.Popen([path], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if not polled.wait(10):
                p.kill()
                raise SystemExit(f"{name} never polled the runtime API")
            times.append((time.perf_counter() - start) * 1000)
            p.kill()
            p.wait()
        times.sort()
        size = os.path.getsize(path) / (1024 * 1024)
        median = statistics.median(times)
        if probe is None:
            probe = median
        label = "probe (same clients, nothing else)" if name == PROBE else name
        print(f"| {label} | {size:.1f} MiB | {median:.1f} ms | {times[int(len(times) * 0.9) - 1]:.1f} ms | {median - probe:+.1f} ms |")
    server.shutdown()


if __name__ == "__main__":
    main()
