"""Fleet mode: several replicas, one runtime state in Redis, one leader deciding (SPEC §9).

`store` is the only module that talks to Redis; `lease`, `counts` and `record` are pure;
`coordinator` wires a member's control plane to the store, through `changes` (the shared
state applied and written), `windows` (the analysis counts) and `status` (what it reports).
Nothing here is imported without a `fleet` block.
"""
