"""The expert-parallel tier: routed experts sharded over expert workers, with placement,
dispatch/combine transports, load statistics, rebalancing and failover."""
