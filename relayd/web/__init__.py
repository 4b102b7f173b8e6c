"""The web listener (SPEC "Web"): the mailbox owner's connect page, the operator's page, and
Prometheus ``/metrics`` and ``/healthz``; served with aiohttp by the main process only."""
