"""The fault tests' fixtures: a private redis-server with AOF and a `Cluster` of real broker and
worker processes (tests/support/cluster.py)."""

from tests.support.cluster import aof_redis, cluster  # noqa: F401  (fixtures)
