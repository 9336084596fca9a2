"""The control plane: the one place that changes what the data plane does.

`plane.ControlPlane` owns the validated config, the runtime weights, the endpoints' health and
the decision record, and publishes each new route table to its subscribers; `weights` holds the
weight rules; `rollouts` is what it asks of the rollout manager, which `proxy/server.py` wires
to it. The package re-exports `ControlPlane`.
"""

from __future__ import annotations

from proxy.control.plane import ControlPlane

__all__ = ["ControlPlane"]
