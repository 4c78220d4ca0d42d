// Drains N no-op jobs with graphile-worker (concurrency 8, batching on:
// a local queue and batched completions), for the side-by-side drain in
// benches/queue.rs (BENCH_GRAPHILE=1) or by hand:
//   benches/peers/setup.sh
//   DATABASE_URL=postgres://... N=100000 node benches/peers/graphile_drain.mjs
// Enqueues N jobs (1000 per addJobs call, not timed), then times a runner
// from its start until the Nth job ran. Prints one JSON line.
// Env: LOCAL_QUEUE (default 100; -1 turns batching off), COMPLETE_DELAY (ms, default 0).
import { run, makeWorkerUtils, Logger } from "graphile-worker";

const connectionString = process.env.DATABASE_URL;
if (!connectionString) {
  console.error("DATABASE_URL is required");
  process.exit(2);
}
const n = Number(process.env.N ?? 100000);
const localQueue = Number(process.env.LOCAL_QUEUE ?? 100);
const completeDelay = Number(process.env.COMPLETE_DELAY ?? 0);
const payload = { kind: "email", to: "someone@example.com", id: "0123456789abcdef" };
const quiet = () => () => {};
const logger = new Logger(quiet);

const utils = await makeWorkerUtils({ connectionString, logger });
await utils.migrate();
await utils.withPgClient((c) => c.query("DELETE FROM graphile_worker._private_jobs"));
for (let sent = 0; sent < n; sent += 1000) {
  const specs = [];
  for (let i = sent; i < Math.min(n, sent + 1000); i++) {
    specs.push({ identifier: "noop", payload });
  }
  await utils.addJobs(specs);
}
await utils.withPgClient((c) => c.query("VACUUM ANALYZE graphile_worker._private_jobs"));

let done = 0;
let finish;
const all = new Promise((resolve) => (finish = resolve));
const start = process.hrtime.bigint();
const runner = await run({
  connectionString,
  concurrency: 8,
  maxPoolSize: 12,
  noHandleSignals: true,
  pollInterval: 1000,
  logger,
  preset: {
    worker: {
      localQueue: localQueue > 1 ? { size: localQueue } : undefined,
      completeJobBatchDelay: completeDelay,
      failJobBatchDelay: completeDelay,
    },
  },
  taskList: {
    noop: async () => {
      if (++done === n) finish();
    },
  },
});
await all;
const seconds = Number(process.hrtime.bigint() - start) / 1e9;
await runner.stop();
await utils.release();
console.log(
  JSON.stringify({ peer: "graphile-worker", jobs: n, local_queue: localQueue, seconds, rate: n / seconds }),
);
