"""The native engine in a process of its own: `client` (the replica's `ServingEngine`), `core`
(the process's loop) and `wire` (what crosses the socket between them)."""
