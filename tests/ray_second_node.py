"""`ray start --block` for a second Ray node on this machine, every listener on loopback (tests/test_cluster.py).

    python tests/ray_second_node.py HEAD_ADDRESS NUM_CPUS

With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment (what keeps Ray's processes on 127.0.0.1) `ray
start --address` refuses to join a cluster, and without it Ray rewrites 127.0.0.1 to the machine's routable
address; so, as shared/notes/stack.md measured, this process allows the cluster and pins the node address to
loopback itself, and the processes it spawns inherit the variable. The node carries the custom resource
`second_node`, so the test can tell its node id apart. Its files go under the head's temp dir.
"""

import sys

import ray._private.ray_constants as ray_constants
import ray._private.services as services

LOOPBACK = "127.0.0.1"

ray_constants.ENABLE_RAY_CLUSTER = True
services.get_node_ip_address = lambda *_, **__: LOOPBACK
services.node_ip_address_from_perspective = lambda *_, **__: LOOPBACK

from ray.scripts.scripts import start  # noqa: E402 - after the patches, which it reads at import

address, num_cpus = sys.argv[1:3]
start.main(
    args=[
        "--block",
        "--address",
        address,
        "--node-ip-address",
        LOOPBACK,
        "--num-cpus",
        num_cpus,
        "--resources",
        '{"second_node": 1}',
    ]
)
