"""The hypervisor contract every coldferry driver implements.

The four migration calls follow Nova's ComputeDriver: the source host runs
``migrate_disk_and_power_off`` and, at the end, ``confirm_migration`` or
``finish_revert_migration``; the destination runs ``finish_migration`` and,
on revert, ``destroy``.
"""

from __future__ import annotations

import abc

from .errors import DriverError
from .model import (DiskInfo, FinishOutcome, Flavor, HostResources, Instance, LiveOutcome, MigrateOutcome,
                    Migration, ProgressHook, Timeline, Vif)


class ComputeDriver(abc.ABC):
    """One hypervisor host.

    Operations that copy disks take ``progress``, a ProgressHook called with
    (file name, Progress) as each copy goes on, possibly from the copier's
    own threads; None reports nothing. The migration calls take ``timeline``, a
    Timeline they record their phases into as each ends (driver.model.PhaseName
    names them), so that a caller sees where the time went, and after a
    failure where the call got to; None records nothing. Every operation
    raises DriverError (a subclass naming what failed) and nothing else for a
    failure it expects.
    """

    #: The name hosts advertise to the scheduler (``QEMU``, ``xen``).
    hypervisor_type = ""

    # -- inventory and power ------------------------------------------------

    @abc.abstractmethod
    def list_instances(self) -> list[Instance]:
        """Every instance defined on this host, with its power state."""

    @abc.abstractmethod
    def get_instance(self, uuid: str) -> Instance:
        """One instance; raises InstanceNotFound."""

    @abc.abstractmethod
    def host_resources(self) -> HostResources:
        """Capacity and use of this host."""

    @abc.abstractmethod
    def power_on(self, instance: Instance) -> None:
        """Start a stopped instance and wait (bounded) until it runs."""

    @abc.abstractmethod
    def power_off(self, instance: Instance, timeout: int = 0, retry_interval: int = 0) -> None:
        """Stop an instance: clean shutdown for up to ``timeout`` seconds, then forced."""

    # -- migration ------------------------------------------------------------

    @abc.abstractmethod
    def migrate_disk_and_power_off(self, instance: Instance, dest: str, flavor: Flavor,
                                   network_info: list[Vif], block_device_info: dict | None = None,
                                   timeout: int = 0, retry_interval: int = 0,
                                   progress: ProgressHook | None = None,
                                   timeline: Timeline | None = None) -> MigrateOutcome:
        """Power the instance off and copy its disks to host ``dest``.

        :param dest: the destination host's address for SSH.
        :param flavor: the flavor the instance will have on the destination.
        :param progress: called as the disks are copied.
        :param timeline: records connect, snapshot, precopy, shutdown, copy, merge as they apply.
        :returns: the disks as the destination has them and every copy's figures.
        :raises DriverError: before power-off for a bad flavor or a full
            target; after it, MigrationFailed with the source restored.
        """

    @abc.abstractmethod
    def finish_migration(self, migration: Migration, instance: Instance, disk_info: list[DiskInfo],
                         network_info: list[Vif], image_meta: dict, resize_instance: bool,
                         block_device_info: dict | None = None, power_on: bool = True,
                         timeline: Timeline | None = None) -> FinishOutcome:
        """On the destination: grow disks, define the instance here and start it.

        :param disk_info: the disks as migrate_disk_and_power_off reported them.
        :param timeline: records commit, grow, define, start as they apply.
        """

    @abc.abstractmethod
    def confirm_migration(self, migration: Migration, instance: Instance, network_info: list[Vif]) -> None:
        """On the source: drop the kept copy and the old definition."""

    @abc.abstractmethod
    def finish_revert_migration(self, instance: Instance, network_info: list[Vif], migration: Migration,
                                block_device_info: dict | None = None, power_on: bool = True) -> None:
        """On the source: bring the instance back from its kept copy."""

    @abc.abstractmethod
    def destroy(self, instance: Instance, network_info: list[Vif], destroy_disks: bool = True) -> None:
        """Stop and undefine an instance here, removing its disks if asked."""

    # -- live migration (optional) -----------------------------------------------

    def live_migration(self, instance: Instance, dest: str, progress: ProgressHook | None = None,
                       timeline: Timeline | None = None) -> LiveOutcome:
        """Move a running instance to host ``dest`` while it keeps running, disks included.

        Not abstract: a driver without live migration keeps this refusal.

        :param dest: the destination host's address (as for migrate_disk_and_power_off).
        :param progress: called as disks made ahead on the destination are copied.
        :param timeline: records connect, precopy, live_migrate as they apply.
        :raises InvalidInstanceState: the instance is not running.
        :raises MigrationFailed: with the instance still running here.
        :raises DriverError: this driver cannot live-migrate.
        """
        kind = self.hypervisor_type or type(self).__name__
        raise DriverError(reason=f"live migration is not supported by the {kind} driver; use a cold migration")
