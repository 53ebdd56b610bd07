"""A local Ray cluster on 127.0.0.1 for the tests, in a process of its own, and a look-up of its workers.

``python tests/ray_cluster.py TEMP_DIR`` starts a head node with two CPUs, prints its address on one line, and
runs until its stdin closes (the test session ends, or pytest dies), then shuts the node down, which stops the
processes it started.

``python tests/ray_cluster.py --replica-pid ADDRESS`` connects (and says ``connected``), waits until a model
replica of a vitattn run is alive on that cluster and prints the PID of its worker process, read from the
cluster's actor table (the GCS state that ``ray list actors`` shows; the state API's HTTP server is the
dashboard, which the test cluster does without).
"""

from __future__ import annotations

import sys
import time


def serve(temp_dir: str) -> None:
    import ray

    ctx = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        logging_level="ERROR",
    )
    print(ctx.address_info["gcs_address"], flush=True)
    sys.stdin.read()  # until the test session closes the pipe
    ray.shutdown()


def replica_pid(address: str, timeout: float = 120.0) -> int:
    import ray
    from ray._private import state

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    print("connected", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for actor in state.actors().values():
            if actor["State"] == "ALIVE" and "_Replica" in actor["ActorClassName"] and actor["Pid"]:
                return int(actor["Pid"])
        time.sleep(0.05)
    raise SystemExit("no vitattn replica came alive")


if __name__ == "__main__":
    if sys.argv[1] == "--replica-pid":
        print(replica_pid(sys.argv[2]), flush=True)
    else:
        serve(sys.argv[1])
