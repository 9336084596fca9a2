"""The control plane: the one place that changes what the data plane does.

`plane.ControlPlane` owns the validated config, the runtime weights, the endpoints' health and
the decision record, and publishes each new route table to its subscribers. Beside it: the
weight rules (`weights`), reloading the file (`reload`), the state file's writes (`statefile`),
GET /status (`status`), and what it asks of the rollout manager (`rollouts`), which
`proxy/server.py` wires to it. The package re-exports `ControlPlane`.
"""

from __future__ import annotations

from proxy.control.plane import ControlPlane

__all__ = ["ControlPlane"]
