"""Which driver an agent serves: built from its configuration's ``driver`` setting."""

from __future__ import annotations

import logging

from driver.base import ComputeDriver

from .config import AgentConfig

log = logging.getLogger(__name__)


def build_driver(config: AgentConfig) -> ComputeDriver:
    """The driver the configuration names: ``libvirt``, ``memory`` or ``xenserver``.

    The xenserver driver runs over a stubbed session (StubSession): VHD files
    in the SR directory and JSON records stand in for a XenServer host, which
    is never contacted. Its copies go host to host with coldferry's stream
    copier, using the SSH settings of ``[driver]`` and its transfer settings (``copy_options``).

    :raises DriverError: the libvirt driver's settings are unusable.
    """
    dc = config.driver_config
    if config.driver == "memory":
        from driver.memory import MemoryDriver
        return MemoryDriver(dc.host_name, address=config.address)
    if config.driver == "xenserver":
        from driver.xenserver import StreamCopier, StubSession, XenServerDriver
        x = config.xenserver
        log.warning("serving the xenserver driver over a stubbed session (SR %s); no XenServer is contacted",
                    x.sr_path)
        session = StubSession(x.sr_path, dc.host_name, config.address, state_path=x.state_path)
        copier = StreamCopier(x.sr_path, ssh_user=dc.ssh_user, ssh_port=dc.ssh_port, ssh_identity=dc.ssh_identity,
                              ssh_known_hosts=dc.ssh_known_hosts, remote_command=dc.remote_command,
                              options=dc.copy_options)
        return XenServerDriver(session, copier, dc.host_name, coalesce_timeout=x.coalesce_timeout)
    from driver.libvirt import LibvirtDriver
    return LibvirtDriver(dc)
