"""Fleet mode: several replicas, one runtime state in Redis, one leader deciding (SPEC §9).

`store` is the only module that talks to Redis; `lease` and `counts` are pure; `coordinator`
wires a member's control plane to the store. Nothing here is imported without a `fleet` block.
"""
