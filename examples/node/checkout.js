// A checkout in Node.js that pays in money and points at once, through the coordinator
// service (`twopc coordinator`), written from protos/twopc/v1/transactions.proto alone.
// The branches: wallet.v1.Debit at the Python wallet, loyalty.v1.RedeemPoints at the
// Node participant (participant.js); the service runs the two-phase commit.
//
//   node checkout.js --coordinator 127.0.0.1:7000 --txn order-1 --account alice --cents 3000 --points 200
//
// Prints the transaction's global id, then "committed" or "aborted <reason>", then one
// line per branch ("<name> <vote> <reason>"). Execute is idempotent by --txn: on
// UNAVAILABLE (the service restarting, an earlier attempt being decided) it retries
// with backoff and the same id until --timeout-s. --wallet and --loyalty name the
// branches' targets as the service's configuration does (default "wallet", "points").
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const ROOT = path.resolve(__dirname, '..', '..');
const TWOPC_PROTOS = path.join(ROOT, 'protos');
const LOYALTY_PROTOS = path.join(ROOT, 'examples', 'loyalty', 'protos');

function parseArgs(argv) {
  const args = { coordinator: '', txn: '', account: '', cents: 0, points: 0,
    wallet: 'wallet', loyalty: 'points', timeoutS: 10 };
  const flags = {
    '--coordinator': (v) => { args.coordinator = v; },
    '--txn': (v) => { args.txn = v; },
    '--account': (v) => { args.account = v; },
    '--cents': (v) => { args.cents = Number(v); },
    '--points': (v) => { args.points = Number(v); },
    '--wallet': (v) => { args.wallet = v; },
    '--loyalty': (v) => { args.loyalty = v; },
    '--timeout-s': (v) => { args.timeoutS = Number(v); },
  };
  for (let i = 0; i < argv.length; i += 2) {
    const set = flags[argv[i]];
    if (!set || argv[i + 1] === undefined) {
      throw new Error('usage: node checkout.js --coordinator HOST:PORT --txn ID --account A --cents N --points N'
        + ` [--wallet TARGET] [--loyalty TARGET] [--timeout-s S]; bad argument ${argv[i]}`);
    }
    set(argv[i + 1]);
  }
  for (const k of ['coordinator', 'txn', 'account']) if (!args[k]) throw new Error(`--${k} is required`);
  return args;
}

// An operation as google.protobuf.Any: its type's URL and its encoded bytes.
function pack(type, fields) {
  return { type_url: `type.googleapis.com/${type.fullName.slice(1)}`, value: type.encode(type.create(fields)).finish() };
}

function execute(client, request, deadline) {
  return new Promise((resolve, reject) => {
    client.Execute(request, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const options = { keepCase: true, longs: String, enums: String, defaults: true };
  const definition = protoLoader.loadSync('twopc/v1/transactions.proto', { ...options, includeDirs: [TWOPC_PROTOS] });
  const { Transactions } = grpc.loadPackageDefinition(definition).twopc.v1;
  const Debit = protobuf.loadSync(path.join(TWOPC_PROTOS, 'wallet/v1/wallet.proto')).lookupType('wallet.v1.Debit');
  const Redeem = protobuf.loadSync(path.join(LOYALTY_PROTOS, 'loyalty/v1/loyalty.proto'))
    .lookupType('loyalty.v1.RedeemPoints');

  const request = {
    txn_id: args.txn,
    timeout_s: 5,
    branches: [
      { name: 'wallet', target: args.wallet, operation: pack(Debit, { account: args.account, amount: args.cents }) },
      { name: 'points', target: args.loyalty, operation: pack(Redeem, { account: args.account, points: args.points }) },
    ],
  };
  const client = new Transactions(args.coordinator, grpc.credentials.createInsecure());
  const giveUp = Date.now() + args.timeoutS * 1000;
  let backoffMs = 50;
  for (;;) {
    try {
      const reply = await execute(client, request, new Date(giveUp));
      const outcome = reply.outcome.replace('OUTCOME_', '').toLowerCase();
      console.log(reply.txn_id);
      console.log(outcome === 'aborted' ? `aborted ${reply.reason}` : outcome);
      for (const b of reply.branches) {
        console.log(`${b.name} ${b.vote.replace('VOTE_', '').toLowerCase()} ${b.reason}`.trimEnd());
      }
      break;
    } catch (err) {
      // Only UNAVAILABLE is worth another try, with the same id; anything else is an answer.
      if (err.code !== grpc.status.UNAVAILABLE || Date.now() + backoffMs >= giveUp) {
        console.error(`checkout: ${grpc.status[err.code] || err.code}: ${err.details || err.message}`);
        process.exitCode = 1;
        break;
      }
      await new Promise((r) => { setTimeout(r, Math.random() * backoffMs); });
      backoffMs = Math.min(backoffMs * 2, 1000);
    }
  }
  client.close();
}

main().catch((err) => {
  console.error(`checkout: ${err.message}`);
  process.exitCode = 1;
});
