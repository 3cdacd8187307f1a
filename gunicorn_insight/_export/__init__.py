"""Turns a master round into exported data: Prometheus multiprocess files, StatsD datagrams, and the
/metrics process with the master's link to it. Nothing here runs in a worker."""
