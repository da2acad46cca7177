// A twopc participant in Node.js, written from protos/twopc/v1/participant.proto
// alone (its comments are the contract; the rules R1-R10 cited below are there).
//
//   node participant.js --db points.jsonl --port 50071
//
// It keeps loyalty points, like examples/loyalty/loyalty_service.py, and accepts the
// same operation, loyalty.v1.RedeemPoints, and the same own API (loyalty.v1.Loyalty:
// Award, GetPoints), so a coordinator cannot tell the two apart.
//
// Durability: every record is one JSON line appended to the --db file. Records the
// protocol relies on (PREPARED, COMMITTED, awards) are fsynced before the answer;
// aborts and tombstones are written without fsync (R6). At start the file is replayed,
// then compacted: decided records older than the retention are dropped (R8).
// Each handler runs to completion without yielding (synchronous file I/O), so no
// two requests interleave.
//
// Prints "READY host:port" once it serves; stops on SIGTERM/SIGINT.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const ROOT = path.resolve(__dirname, '..', '..');
const TWOPC_PROTOS = path.join(ROOT, 'protos');
const LOYALTY_PROTOS = path.join(ROOT, 'examples', 'loyalty', 'protos');
const OPERATION = 'loyalty.v1.RedeemPoints';
const MAX_ID = 256; // characters in a txn id or an account: every input has a bound

// --- command line -------------------------------------------------------------------

function parseArgs(argv) {
  const args = {
    db: '', host: '127.0.0.1', port: 0,
    inDoubtAfterS: 10, resolveIntervalS: 2, rpcTimeoutS: 2, retentionS: 7 * 24 * 3600,
  };
  const flags = {
    '--db': (v) => { args.db = v; },
    '--host': (v) => { args.host = v; },
    '--port': (v) => { args.port = Number(v); },
    '--in-doubt-after-s': (v) => { args.inDoubtAfterS = Number(v); },
    '--resolve-interval-s': (v) => { args.resolveIntervalS = Number(v); },
    '--retention-s': (v) => { args.retentionS = Number(v); },
  };
  for (let i = 0; i < argv.length; i += 2) {
    const set = flags[argv[i]];
    if (!set || argv[i + 1] === undefined) {
      throw new Error(`usage: node participant.js --db FILE [--host H] [--port P] [--in-doubt-after-s S] `
        + `[--resolve-interval-s S] [--retention-s S]; bad argument ${argv[i]}`);
    }
    set(argv[i + 1]);
  }
  if (!args.db) throw new Error('--db is required');
  for (const k of ['port', 'inDoubtAfterS', 'resolveIntervalS', 'retentionS']) {
    if (!Number.isFinite(args[k]) || args[k] < 0) throw new Error(`bad value for ${k}`);
  }
  return args;
}

function log(level, event, fields = {}) {
  process.stderr.write(JSON.stringify({ timestamp: new Date().toISOString(), level, event, ...fields }) + '\n');
}

// --- the durable store: a JSON-lines file ----------------------------------------------

class Store {
  constructor(file, retentionS) {
    this.file = file;
    this.retentionMs = retentionS * 1000;
    this.accounts = new Map(); // account -> points (including held ones)
    this.txns = new Map(); // txn id -> {state, coordinator, digest, account, points, preparedAt, decidedAt}
    this.failed = null;
    this.replay();
    this.compact();
    this.fd = fs.openSync(this.file, 'a');
  }

  replay() {
    if (!fs.existsSync(this.file)) return;
    const lines = fs.readFileSync(this.file, 'utf8').split('\n');
    lines.forEach((line, i) => {
      if (!line) return;
      let record;
      try {
        record = JSON.parse(line);
      } catch (e) {
        // Only the last line can be torn (a crash mid-append, never acknowledged).
        if (i >= lines.length - 2) return;
        throw new Error(`${this.file}:${i + 1} is corrupt: ${e.message}`);
      }
      this.apply(record);
    });
  }

  apply(r) {
    switch (r.t) {
      case 'award':
        this.accounts.set(r.account, (this.accounts.get(r.account) || 0) + r.points);
        break;
      case 'prepared':
        this.txns.set(r.txn, {
          state: 'PREPARED', coordinator: r.coordinator, digest: r.digest,
          account: r.account, points: r.points, preparedAt: r.at, decidedAt: null,
        });
        break;
      case 'committed': {
        const t = this.txns.get(r.txn);
        if (r.points !== undefined) { // a compacted or one-phase record carries its operation
          this.txns.set(r.txn, {
            state: 'COMMITTED', coordinator: '', digest: r.digest, account: r.account,
            points: r.points, preparedAt: r.at, decidedAt: r.at,
          });
          if (!r.compacted) this.accounts.set(r.account, this.accounts.get(r.account) - r.points);
        } else {
          t.state = 'COMMITTED';
          t.decidedAt = r.at;
          this.accounts.set(t.account, this.accounts.get(t.account) - t.points);
        }
        break;
      }
      case 'aborted': {
        const t = this.txns.get(r.txn);
        if (t && t.state === 'PREPARED') {
          t.state = 'ABORTED';
          t.decidedAt = r.at;
        } else if (!t) { // a tombstone
          this.txns.set(r.txn, { state: 'ABORTED', coordinator: '', digest: r.digest || '', decidedAt: r.at });
        }
        break;
      }
      default:
        throw new Error(`unknown record ${JSON.stringify(r)}`);
    }
  }

  // Rewrites the file with what is still needed: balances, prepared transactions, and
  // decided ones within the retention. Written aside, fsynced, then renamed over.
  compact() {
    const cutoff = Date.now() - this.retentionMs;
    const lines = [];
    for (const [account, points] of this.accounts) lines.push({ t: 'award', account, points });
    for (const [txn, t] of this.txns) {
      if (t.state !== 'PREPARED' && t.decidedAt < cutoff) {
        this.txns.delete(txn);
      } else if (t.state === 'PREPARED') {
        lines.push({ t: 'prepared', txn, coordinator: t.coordinator, digest: t.digest,
          account: t.account, points: t.points, at: t.preparedAt });
      } else if (t.state === 'COMMITTED') {
        lines.push({ t: 'committed', txn, digest: t.digest, account: t.account, points: t.points,
          at: t.decidedAt, compacted: true });
      } else {
        lines.push({ t: 'aborted', txn, digest: t.digest, at: t.decidedAt });
      }
    }
    const tmp = `${this.file}.compact`;
    const fd = fs.openSync(tmp, 'w');
    fs.writeSync(fd, lines.map((l) => JSON.stringify(l) + '\n').join(''));
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.renameSync(tmp, this.file);
    const dir = fs.openSync(path.dirname(path.resolve(this.file)), 'r');
    fs.fsyncSync(dir); // the rename itself must survive a crash
    fs.closeSync(dir);
  }

  // Appends a record, forced to disk when `durable` (R6), then applies it in memory.
  // A failed write or fsync is fatal (R9): the store refuses everything after it.
  append(record, durable) {
    if (this.failed) throw this.failed;
    try {
      fs.writeSync(this.fd, JSON.stringify(record) + '\n');
      if (durable) fs.fsyncSync(this.fd);
    } catch (e) {
      e.storeFailure = true;
      this.failed = e;
      log('critical', 'store_write_failed', { error: e.message });
      throw e;
    }
    this.apply(record);
  }

  held(account) {
    let sum = 0;
    for (const t of this.txns.values()) if (t.state === 'PREPARED' && t.account === account) sum += t.points;
    return sum;
  }
}

// --- the gRPC services -----------------------------------------------------------------

class Status extends Error {
  constructor(code, details) {
    super(details);
    this.code = code;
    this.details = details;
  }
}

function checkTxnId(txnId) {
  if (!txnId || txnId.length > MAX_ID) {
    throw new Status(grpc.status.INVALID_ARGUMENT, `txn_id must be 1 to ${MAX_ID} characters`);
  }
}

function unary(fn) {
  return (call, callback) => {
    try {
      callback(null, fn(call.request, call));
    } catch (e) {
      if (e instanceof Status) {
        callback({ code: e.code, details: e.details });
      } else if (e.storeFailure) { // R9: the store has stopped; restart the process
        callback({ code: grpc.status.UNAVAILABLE, details: `participant store failed: ${e.message}` });
      } else { // a bug here: loud, and a documented status (never UNKNOWN)
        log('critical', 'handler_raised', { method: call.getPath(), error: e.stack });
        callback({ code: grpc.status.INTERNAL, details: `participant failed: ${e.name}` });
      }
    }
  };
}

function participantService(store, RedeemPoints, crashAt) {
  const vote = (v, reason = '') => ({ vote: v, reason });
  const refuse = (txn, reason) => {
    log('info', 'prepared', { txn_id: txn, vote: 'abort', reason });
    return vote('VOTE_ABORT', reason);
  };

  function prepare(req, call) {
    checkTxnId(req.txn_id);
    if (!req.operation) throw new Status(grpc.status.INVALID_ARGUMENT, 'operation is required');
    const typeName = req.operation.type_url.split('/').pop();
    if (typeName !== OPERATION) {
      throw new Status(grpc.status.INVALID_ARGUMENT,
        `unknown operation type ${JSON.stringify(req.operation.type_url)}; this participant accepts ${OPERATION}`);
    }
    const digest = crypto.createHash('sha256').update(req.operation.type_url).update('\0')
      .update(req.operation.value).digest('hex');
    const known = store.txns.get(req.txn_id);
    if (known) { // R3: a repeat gets the first answer; R4: a tombstone refuses
      if (known.state === 'ABORTED') return refuse(req.txn_id, 'transaction already aborted');
      if (known.digest !== digest) return refuse(req.txn_id, 'transaction id already used for another operation');
      return vote('VOTE_COMMIT');
    }
    const deadline = call.getDeadline(); // R2: check the deadline before voting
    const deadlineMs = deadline instanceof Date ? deadline.getTime() : Number(deadline);
    if (Number.isFinite(deadlineMs) && Date.now() >= deadlineMs) {
      return refuse(req.txn_id, 'deadline passed before prepare');
    }
    let redeem;
    try {
      redeem = RedeemPoints.toObject(RedeemPoints.decode(req.operation.value), { longs: Number, defaults: true });
    } catch (e) {
      throw new Status(grpc.status.INVALID_ARGUMENT, `operation does not parse: ${e.message}`);
    }
    if (!redeem.account || redeem.account.length > MAX_ID) {
      throw new Status(grpc.status.INVALID_ARGUMENT, `account must be 1 to ${MAX_ID} characters`);
    }
    if (!(redeem.points > 0) || !Number.isSafeInteger(redeem.points)) {
      throw new Status(grpc.status.INVALID_ARGUMENT, `points must be > 0, got ${redeem.points}`);
    }
    if (!store.accounts.has(redeem.account)) {
      throw new Status(grpc.status.NOT_FOUND, `no loyalty account ${JSON.stringify(redeem.account)}`);
    }
    const available = store.accounts.get(redeem.account) - store.held(redeem.account);
    if (available < redeem.points) {
      return refuse(req.txn_id, `not enough points: available ${available}, needed ${redeem.points}`);
    }
    const at = Date.now();
    if (req.one_phase) { // the only branch: commit now, forced, and say so
      store.append({ t: 'committed', txn: req.txn_id, digest, account: redeem.account, points: redeem.points, at }, true);
      log('info', 'prepared', { txn_id: req.txn_id, vote: 'commit', one_phase: true });
      return vote('VOTE_COMMIT');
    }
    // R1: the reservation and the PREPARED record reach the disk before the vote.
    store.append({ t: 'prepared', txn: req.txn_id, coordinator: req.coordinator, digest,
      account: redeem.account, points: redeem.points, at }, true);
    log('info', 'prepared', { txn_id: req.txn_id, vote: 'commit' });
    return vote('VOTE_COMMIT');
  }

  return {
    // R2 with relative gRPC deadlines: a process that was stalled (SIGSTOP, a long
    // GC pause) reads the request late and computes its deadline from that moment,
    // so it cannot see that the caller gave up. The caller's cancellation (sent when
    // its deadline passed) is read in the same turn as the request: look once more,
    // one turn later, before reserving anything.
    Prepare: (call, callback) => setImmediate(() => {
      if (call.cancelled) {
        log('info', 'prepare_abandoned', { txn_id: call.request.txn_id });
        callback({ code: grpc.status.CANCELLED, details: 'the caller gave up before the vote' });
        return;
      }
      unary(prepare)(call, callback);
    }),
    Commit: unary((req) => {
      checkTxnId(req.txn_id);
      if (crashAt === 'participant.before_commit') process.kill(process.pid, 'SIGKILL');
      decide(store, req.txn_id, 'COMMITTED');
      return {};
    }),
    Abort: unary((req) => {
      checkTxnId(req.txn_id);
      decide(store, req.txn_id, 'ABORTED');
      return {};
    }),
    // Optional in the contract: the coordinator then sends Commit (Prepare) one by one.
    CommitMany: (call, callback) => callback({ code: grpc.status.UNIMPLEMENTED, details: 'send Commit one by one' }),
    PrepareMany: (call, callback) => callback({ code: grpc.status.UNIMPLEMENTED, details: 'send Prepare one by one' }),
  };
}

// Applies a decision idempotently (R5); COMMITTED is forced, ABORTED lazy (R6).
function decide(store, txn, state) {
  const t = store.txns.get(txn);
  const at = Date.now();
  if (state === 'COMMITTED') {
    if (!t) throw new Status(grpc.status.FAILED_PRECONDITION, `cannot commit ${txn}: never prepared here`);
    if (t.state === 'ABORTED') throw new Status(grpc.status.FAILED_PRECONDITION, `cannot commit ${txn}: already aborted`);
    if (t.state === 'PREPARED') {
      store.append({ t: 'committed', txn, at }, true);
      log('info', 'decided', { txn_id: txn, state });
    }
    return;
  }
  if (t && t.state === 'COMMITTED') {
    throw new Status(grpc.status.FAILED_PRECONDITION, `cannot abort ${txn}: already committed`);
  }
  if (!t || t.state === 'PREPARED') { // R4: an unknown transaction leaves a tombstone
    store.append({ t: 'aborted', txn, at }, false);
    log('info', 'decided', { txn_id: txn, state, tombstone: !t });
  }
}

function loyaltyService(store) {
  const points = (account) => {
    if (!store.accounts.has(account)) {
      throw new Status(grpc.status.NOT_FOUND, `no loyalty account ${JSON.stringify(account)}`);
    }
    const total = store.accounts.get(account);
    const held = store.held(account);
    return { account, points: total, held, available: total - held };
  };
  return {
    Award: unary((req) => {
      const n = Number(req.points);
      if (!req.account || req.account.length > MAX_ID || !(n > 0) || !Number.isSafeInteger(n)) {
        throw new Status(grpc.status.INVALID_ARGUMENT, 'account and points > 0 are required');
      }
      store.append({ t: 'award', account: req.account, points: n }, true);
      return points(req.account);
    }),
    GetPoints: unary((req) => points(req.account)),
  };
}

// --- in-doubt resolution (R7) ------------------------------------------------------------

function startResolver(store, CoordinatorClient, args) {
  const clients = new Map();
  const client = (address) => {
    if (!clients.has(address)) clients.set(address, new CoordinatorClient(address, grpc.credentials.createInsecure()));
    return clients.get(address);
  };
  const warned = new Set();
  let running = false;
  const round = () => {
    if (running) return;
    running = true;
    const cutoff = Date.now() - args.inDoubtAfterS * 1000;
    const asks = [];
    for (const [txn, t] of store.txns) {
      if (t.state !== 'PREPARED' || t.preparedAt > cutoff) continue;
      if (!t.coordinator) { // nobody to ask: wait for the coordinator, never decide alone
        if (!warned.has(txn)) log('warning', 'in_doubt_no_coordinator', { txn_id: txn });
        warned.add(txn);
        continue;
      }
      asks.push(new Promise((resolve) => {
        const deadline = new Date(Date.now() + args.rpcTimeoutS * 1000);
        client(t.coordinator).GetOutcome({ txn_id: txn }, { deadline }, (err, reply) => {
          if (err) {
            log('info', 'in_doubt_unreachable', { txn_id: txn, coordinator: t.coordinator, error: err.details });
          } else {
            log('info', 'in_doubt_asked', { txn_id: txn, outcome: reply.outcome });
            try {
              if (reply.outcome === 'OUTCOME_COMMITTED') decide(store, txn, 'COMMITTED');
              else if (reply.outcome === 'OUTCOME_ABORTED') decide(store, txn, 'ABORTED');
              // PENDING (or anything else): keep the reservation, ask again next round.
            } catch (e) {
              log('error', 'in_doubt_apply_failed', { txn_id: txn, error: e.message });
            }
          }
          resolve();
        });
      }));
    }
    Promise.all(asks).finally(() => { running = false; });
  };
  const tick = () => {
    round();
    timer = setTimeout(tick, args.resolveIntervalS * 1000 * (0.5 + Math.random()));
  };
  let timer = setTimeout(tick, args.resolveIntervalS * 1000 * (0.5 + Math.random()));
  return () => {
    clearTimeout(timer);
    for (const c of clients.values()) c.close();
  };
}

// --- main ------------------------------------------------------------------------------

function main() {
  const args = parseArgs(process.argv.slice(2));
  const options = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
  const definition = protoLoader.loadSync(
    ['twopc/v1/participant.proto', 'twopc/v1/coordinator.proto', 'loyalty/v1/loyalty.proto'],
    { ...options, includeDirs: [TWOPC_PROTOS, LOYALTY_PROTOS] },
  );
  const loaded = grpc.loadPackageDefinition(definition);
  const RedeemPoints = protobuf.loadSync(path.join(LOYALTY_PROTOS, 'loyalty/v1/loyalty.proto')).lookupType(OPERATION);

  const store = new Store(args.db, args.retentionS);
  const server = new grpc.Server();
  server.addService(loaded.twopc.v1.Participant.service,
    participantService(store, RedeemPoints, process.env.TWOPC_CRASH_AT || ''));
  server.addService(loaded.loyalty.v1.Loyalty.service, loyaltyService(store));
  server.bindAsync(`${args.host}:${args.port}`, grpc.ServerCredentials.createInsecure(), (err, port) => {
    if (err) {
      log('critical', 'bind_failed', { error: err.message });
      process.exit(1);
    }
    const stopResolver = startResolver(store, loaded.twopc.v1.Coordinator, args);
    log('info', 'participant_started', { address: `${args.host}:${port}`, db: args.db });
    process.stdout.write(`READY ${args.host}:${port}\n`);
    const stop = () => {
      stopResolver();
      server.tryShutdown(() => {
        fs.closeSync(store.fd);
        process.exit(0);
      });
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
  });
}

main();
