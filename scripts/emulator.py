"""DynamoDB/SQS-compatible emulator (moto) for tests and local use.

Served single-threaded: moto's in-memory backends are not safe under concurrent requests,
and serving one request at a time makes each TransactWriteItems atomic, as it is in AWS.
Usage: python scripts/emulator.py PORT
"""

import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 5055
    app = DomainDispatcherApplication(create_backend_app)
    run_simple("127.0.0.1", port, app, threaded=False, use_reloader=False)


if __name__ == "__main__":
    main()
