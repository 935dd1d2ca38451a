"""The benchmark harness of `probe` (issue 6): ``python -m benchmarks [--quick] [--json PATH]``.

Runs the engine against the throwaway servers of `probe.testing` and, in the
same run, the references a user would compare it with (native clients, the
bare async drivers, the sync drivers in a thread pool), then prints one
markdown table and writes every figure to a JSON file.

Modules:

- `harness`: the command line, the plan of measurements, the table and the targets;
- `servers`: starts the fleet (PostgreSQL, MariaDB, the MongoDB wire server and
  the fault servers, the last two in their own processes) and its bench users;
- `worker`: one measurement in a fresh Python process (clean CPU, RSS, GC);
- `native`: `pgbench -C` and the small libmariadb C client (`mariadb_connect.c`).
"""
