"""Test helpers, not pipeline stages: tiny randomly initialised encoders for the demo, the tests
and the benchmarks (``shardkit tiny-models`` writes them). Their features are meaningless."""
