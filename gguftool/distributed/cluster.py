"""Connecting to a Ray cluster: the one place that imports Ray.

``--ray`` on convert, quantize and imatrix takes an optional address: ``local`` (or a bare ``--ray``) starts a
local cluster on this machine (its worker processes are the "machines"), ``auto`` joins the cluster this machine belongs to, and
``ray://host:10001`` or ``host:6379`` names one. Without the extra installed the option fails with one line
saying how to get it.
"""
from __future__ import annotations

from types import ModuleType

from ..errors import ClusterError

INSTALL_HINT = "--ray needs Ray: pip install 'gguftool[ray]'"
LOCAL = "local"     # the value of a bare --ray: start a local cluster


def require_ray() -> ModuleType:
    """The ``ray`` module, or ClusterError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ClusterError(INSTALL_HINT) from None
    return ray


def connect(address: str, *, num_cpus: int | None = None) -> ModuleType:
    """Join the cluster at ``address`` (LOCAL: start one here with ``num_cpus`` worker slots) unless this process
    is already connected; returns the ``ray`` module."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    try:
        if address == LOCAL:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a local cluster" if address == LOCAL else f"the cluster at {address!r}"
        raise ClusterError(f"cannot connect to {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    return ray
