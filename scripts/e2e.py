"""End-to-end run of the real Lambda binaries under `cargo lambda watch` against the
DynamoDB/SQS emulator. The table and queues are created from infra/template.yaml, the
functions are invoked with the files in events/, and the results are read back from
DynamoDB and SQS:

  1. a signed Stripe delivery -> stripe-webhook -> billing FIFO queue -> billing-events
     -> credits in the ledger, visible through credits-api;
  2. the same delivery again credits nothing more, and a forged one queues nothing;
  3. a poison message is retried until the redrive policy moves it to the dead-letter queue.

Usage: DYNAMODB_ENDPOINT=http://127.0.0.1:PORT python scripts/e2e.py
"""

import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import boto3
from cfnlint.decode.cfn_yaml import load as load_template

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "whsec_tally_dev"
ENDPOINT = os.environ["DYNAMODB_ENDPOINT"]
REGION = "us-east-1"
CREDS = dict(aws_access_key_id="local", aws_secret_access_key="local", region_name=REGION)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout_s=600.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def event_file(function, name):
    with open(os.path.join(ROOT, "events", function, name)) as f:
        return json.load(f)


class Watch:
    """`cargo lambda watch` serving every function binary of the workspace."""

    def __init__(self, env):
        self.port = free_port()
        vars_ = ",".join(f"{k}={v}" for k, v in env.items())
        self.proc = subprocess.Popen(
            ["cargo", "lambda", "watch", "--ignore-changes", "--invoke-port", str(self.port),
             "--env-vars", vars_],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(os.path.join(ROOT, ".tmp", "watch.log"), "w"))

        def up():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_for("cargo lambda watch", up, 120)

    def invoke(self, function, payload):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(payload, f)
        out = subprocess.run(
            ["cargo", "lambda", "invoke", function, "--invoke-port", str(self.port),
             "--data-file", f.name, "--output-format", "json"],
            cwd=ROOT, capture_output=True, text=True, timeout=900)
        os.unlink(f.name)
        if out.returncode != 0:
            raise AssertionError(f"invoke {function} failed: {out.stderr}")
        return json.loads(out.stdout)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def resign(event):
    """Signs an API Gateway event's Stripe body again, now (signatures last 300 s)."""
    t = int(time.time())
    sig = hmac.new(SECRET.encode(), f"{t}.{event['body']}".encode(), hashlib.sha256).hexdigest()
    event["headers"]["stripe-signature"] = f"t={t},v1={sig}"
    return event


def sqs_event(messages):
    return {"Records": [{
        "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
        "attributes": m.get("Attributes", {}), "messageAttributes": {},
        "md5OfBody": m["MD5OfBody"], "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:e2e", "awsRegion": REGION}
        for m in messages]}


def main():
    template = load_template(os.path.join(ROOT, "infra", "template.yaml"))
    resources = template["Resources"]
    stack = f"e2e{uuid.uuid4().hex[:8]}"
    dynamo = boto3.client("dynamodb", endpoint_url=ENDPOINT, **CREDS)
    sqs = boto3.client("sqs", endpoint_url=ENDPOINT, **CREDS)

    # The table and the queues exactly as the template declares them.
    t = resources["Table"]["Properties"]
    table = f"{stack}-table"
    dynamo.create_table(TableName=table, BillingMode=t["BillingMode"],
                        AttributeDefinitions=t["AttributeDefinitions"], KeySchema=t["KeySchema"],
                        GlobalSecondaryIndexes=t.get("GlobalSecondaryIndexes", []))
    dynamo.update_time_to_live(TableName=table, TimeToLiveSpecification={
        "AttributeName": t["TimeToLiveSpecification"]["AttributeName"], "Enabled": True})
    dlq_props = resources["BillingEventsDeadLetterQueue"]["Properties"]
    q_props = resources["BillingEventsQueue"]["Properties"]
    name = lambda props: props["QueueName"]["Fn::Sub"].replace("${AWS::StackName}", stack)
    dlq = sqs.create_queue(QueueName=name(dlq_props), Attributes={"FifoQueue": "true"})["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    max_receives = int(q_props["RedrivePolicy"]["maxReceiveCount"])
    queue = sqs.create_queue(QueueName=name(q_props), Attributes={
        "FifoQueue": "true",
        "ContentBasedDeduplication": str(q_props["ContentBasedDeduplication"]).lower(),
        "VisibilityTimeout": str(q_props["VisibilityTimeout"]),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receives}),
    })["QueueUrl"]

    n_props = resources["NotificationsQueue"]["Properties"]
    notifications = sqs.create_queue(QueueName=name(n_props))["QueueUrl"]

    env = {"TALLY_TABLE": table, "NOTIFICATIONS_QUEUE_URL": notifications, "DYNAMODB_ENDPOINT": ENDPOINT, "SQS_ENDPOINT": ENDPOINT,
           "BILLING_EVENTS_QUEUE_URL": queue, "STRIPE_WEBHOOK_SECRET": SECRET,
           "STRIPE_SECRET_KEY": "sk_test_e2e", "TALLY_APP_URL": "https://studio.example",
           "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
           "RUST_LOG": "info"}
    watch = Watch(env)
    try:
        # 1. Purchase: webhook -> FIFO queue -> worker -> ledger.
        delivery = resign(event_file("stripe-webhook", "checkout-session-completed-pack.json"))
        answer = watch.invoke("stripe-webhook", delivery)
        assert answer["statusCode"] == 200, answer
        got = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, AttributeNames=["All"])["Messages"]
        assert len(got) == 1, got
        assert got[0]["Body"] == delivery["body"], "queued byte for byte"
        assert got[0]["Attributes"]["MessageGroupId"] == "cus_Acme"
        result = watch.invoke("billing-events", sqs_event(got))
        assert result == {"batchItemFailures": []}, result
        sqs.delete_message(QueueUrl=queue, ReceiptHandle=got[0]["ReceiptHandle"])
        item = dynamo.get_item(TableName=table, Key={"PK": {"S": "WORKSPACE#acme"}, "SK": {"S": "STATE"}},
                               ConsistentRead=True)["Item"]
        state = json.loads(item["body"]["S"])
        assert sum(l["remaining"] for l in state["lots"]) == 500, state
        balance = watch.invoke("credits-api", event_file("credits-api", "get-balance.json"))
        assert balance["statusCode"] == 200, balance
        assert json.loads(balance["body"])["available"] == 500, balance

        # 2. Stripe delivers the same event again: acknowledged; whether or not the queue's
        # deduplication drops it, applying it again credits nothing more.
        again = watch.invoke("stripe-webhook", resign(event_file("stripe-webhook", "checkout-session-completed-pack.json")))
        assert again["statusCode"] == 200, again
        dup = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, AttributeNames=["All"]).get("Messages", [])
        if dup:
            assert watch.invoke("billing-events", sqs_event(dup)) == {"batchItemFailures": []}
            for m in dup:
                sqs.delete_message(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"])
        balance = watch.invoke("credits-api", event_file("credits-api", "get-balance.json"))
        assert json.loads(balance["body"])["available"] == 500, balance

        # A forged delivery is refused and queues nothing.
        forged = watch.invoke("stripe-webhook", event_file("stripe-webhook", "forged-signature.json"))
        assert forged["statusCode"] == 400, forged
        assert "Messages" not in sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)

        # 3. A poison message: every attempt fails, then the redrive policy dead-letters it.
        sqs.send_message(QueueUrl=queue, MessageBody="{not a stripe event",
                         MessageGroupId="cus_Poison", MessageDeduplicationId="poison-1")
        attempts = 0
        while True:
            got = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=1, AttributeNames=["All"]).get("Messages", [])
            if not got:
                break
            attempts += 1
            result = watch.invoke("billing-events", sqs_event(got))
            assert result["batchItemFailures"] == [{"itemIdentifier": got[0]["MessageId"]}], result
            # What Lambda does with a reported failure: the message becomes visible again
            # (here at once instead of after the visibility timeout).
            sqs.change_message_visibility(QueueUrl=queue, ReceiptHandle=got[0]["ReceiptHandle"], VisibilityTimeout=0)
            assert attempts <= max_receives, "the poison message was never dead-lettered"
        assert attempts == max_receives, attempts
        dead = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10).get("Messages", [])
        assert [m["Body"] for m in dead] == ["{not a stripe event"], dead
        print(f"e2e passed: purchase credited once through the real binaries; forgery refused; "
              f"poison dead-lettered after {attempts} attempts")
    finally:
        watch.stop()


if __name__ == "__main__":
    sys.exit(main())
