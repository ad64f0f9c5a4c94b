"""What every process shares to reach Redis and other processes: connections, Sentinel, outages,
the embedded server, process inspection, failpoints."""
