// stripe-node's constructEvent on the same delivery as the Rust bench
// (functions/stripe-webhook/benches/verify.rs): one core, events verified and parsed per
// second. Run by `make bench` after `npm install` of the pinned stripe package.
"use strict";
const fs = require("fs");
const path = require("path");
const Stripe = require(process.env.STRIPE_NODE || "stripe");

const SECRET = "whsec_bench_secret_0123456789";
const NOW = 1795000000;
const root = path.join(__dirname, "..", "fixtures", "stripe");
const read = (name) => JSON.parse(fs.readFileSync(path.join(root, name + ".json"), "utf8"));

const event = read("event");
event.type = "checkout.session.completed";
event.created = NOW;
event.data = { object: read("checkout.session") };
const body = JSON.stringify(event);

const stripe = new Stripe("sk_test_bench");
const header = stripe.webhooks.generateTestHeaderString({ payload: body, secret: SECRET, timestamp: NOW });
// constructEvent checks the timestamp against the real clock; the tolerance is widened so
// the fixed bench timestamp stays valid, as the Rust bench passes its `now`.
const tolerance = Math.floor(Date.now() / 1000) - NOW + 3600;
stripe.webhooks.constructEvent(body, header, SECRET, Math.abs(tolerance));

function run(seconds) {
  let n = 0;
  const end = process.hrtime.bigint() + BigInt(seconds * 1e9);
  const start = process.hrtime.bigint();
  while (process.hrtime.bigint() < end) {
    for (let i = 0; i < 1000; i++) {
      stripe.webhooks.constructEvent(body, header, SECRET, Math.abs(tolerance));
    }
    n += 1000;
  }
  const secs = Number(process.hrtime.bigint() - start) / 1e9;
  return n / secs;
}

run(1); // warm-up
const rates = [run(3), run(3), run(3)].sort((a, b) => a - b);
console.log(JSON.stringify({
  implementation: "stripe-node constructEvent",
  version: require((process.env.STRIPE_NODE || "stripe") + "/package.json").version,
  body_bytes: body.length,
  events_per_second_median: Math.round(rates[1]),
  mean_microseconds: +(1e6 / rates[1]).toFixed(2),
}));
