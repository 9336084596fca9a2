"""Worker processes behind one control plane (`workers: N`).

With N > 1 the parent runs the control plane only (config and reloads, admin API, health checks,
state file) and N worker processes each run a `DataPlane` on their own `SO_REUSEPORT` listeners,
so the kernel spreads connections over them. `channel` carries the messages, `counters` the
counter deltas, `supervisor` is the parent's side and `child` the worker's.

One socketpair per worker carries length-prefixed pickles both ways (only between our own
processes). The parent pushes every new `RouteTable` and waits for the workers' acks before a
change is acknowledged; the workers send counter deltas at least every `REPORT_INTERVAL` and on
request, and the parent folds them into its own `StatsRegistry`, so everything that reads the
counters (the `/metrics` collector, `/status`, the rollout analysis) sees one process.

A worker goes through these states; only the parent moves it on:

    STARTING --loaded--> JOINING (told to serve) --listening--> LISTENING --stop--> STOPPING
        any state --process exit--> EXITED (restarted unless the pool is stopping)

A worker is told to serve only after it has loaded the table in force; every table pushed before
that message is ahead of it in the same stream, so a worker never serves with a table older than
the one in force when it joined. From JOINING on it counts for the acks.
"""
