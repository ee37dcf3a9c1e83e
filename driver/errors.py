"""The driver's errors: what went wrong and what to do, from one template each."""

from __future__ import annotations

from transfer.errors import TemplateError


class DriverError(TemplateError):
    msg = "driver error: {reason}"


class InstanceNotFound(DriverError):
    msg = "instance {uuid} is not defined on this host ({host})"


class InvalidInstanceState(DriverError):
    msg = "instance {uuid} is {state}: {reason}"


class ResizeDown(DriverError):
    msg = ("flavor {flavor} would shrink disk {disk} of instance {uuid} from {current_gb} GiB to "
           "{wanted_gb} GiB; disks can only grow, pick a flavor with root_gb >= {current_gb}")


class InsufficientSpace(DriverError):
    msg = ("host {host} has {free_h} free under {path}, instance {uuid} needs {needed_h}; "
           "free space there or choose another host")


class PowerOffFailed(DriverError):
    msg = "could not power off instance {uuid}: {reason}"


class StartFailed(DriverError):
    msg = "instance {uuid} did not reach running on {host}: {reason}"


class BridgeMissing(DriverError):
    msg = ("bridge {bridge} for interface {mac} does not exist on {host}; create it there or set "
           "create_bridges = true in the driver configuration")


class MigrationFailed(DriverError):
    msg = ("migration of instance {uuid} to {dest} failed: {reason}. The source instance was "
           "restored{restored}")


class ImageError(DriverError):
    msg = "disk image {path}: {reason}"


class RemoteOpFailed(DriverError):
    msg = "on {host}: {reason}"


class HostError(DriverError):
    msg = "could not {what} on host {host}: {reason}"


class InstancesPathMissing(DriverError):
    msg = ("the instances directory {path} does not exist on host {host}; create it, or correct "
           "instances_path in the [driver] section of the agent's configuration")
