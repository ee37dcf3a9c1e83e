"""Fixtures of the functional tests: the multi-host lab (tests/support/lab.py)."""

from __future__ import annotations

import atexit
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from tests.support import guest
from tests.support.lab import Lab

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LAB_HOSTS = int(os.environ.get("COLDFERRY_LAB_HOSTS", "2"))
LAB_LOGS = REPO / "test-artifacts" / "lab-logs"


class _Teardown:
    """Tears the lab down exactly once: from the fixture, or from atexit as a last resort."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.done = False
        self.pid = os.getpid()

    def __call__(self) -> None:
        if self.done or os.getpid() != self.pid:  # a forked child's atexit: not its lab
            return
        self.done = True
        try:
            self.lab.collect_logs(LAB_LOGS)
        except OSError as exc:
            log.warning("could not copy the lab's logs to %s: %s", LAB_LOGS, exc)
        self.lab.down()


_PYTEST_PID = os.getpid()


def _sigterm_to_interrupt(signum: int, frame: FrameType | None) -> None:
    # pyroute2 forks helpers from this process and ends them with SIGTERM. One caught
    # before it resets the handler must just end: as KeyboardInterrupt it would unwind
    # a copy of the test session and tear down the lab under the real one.
    if os.getpid() != _PYTEST_PID:
        os._exit(128 + signum)
    # A CI job's timeout sends SIGTERM; as KeyboardInterrupt it runs fixture teardown.
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """A lab of host1..hostN (N from $COLDFERRY_LAB_HOSTS, default 2), each with its own
    network and mount namespace, libvirtd, virtlogd and sshd; torn down at the end of
    the session whatever happens.

    It takes the first free lab slot, so concurrent test runs and a lab made with
    ``scripts/lab up`` coexist: use ``host.ip`` and ``host.libvirt_uri``, never fixed
    addresses. Labs left behind by crashed runs are torn down first."""
    if os.geteuid() != 0:
        pytest.fail("the lab needs root: run the tests as root (scripts/test)")
    the_lab = Lab.up_in_free_slot(LAB_HOSTS)
    teardown = _Teardown(the_lab)
    atexit.register(teardown)
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        yield the_lab
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        teardown()
        atexit.unregister(teardown)


@pytest.fixture(scope="session")
def image() -> guest.GuestImage:
    """The test guest, built once (scripts/make-test-guest)."""
    return guest.ensure_built()


@pytest.fixture(scope="session")
def domain_type(image: guest.GuestImage) -> str:
    """kvm where the guest boots under KVM here, else qemu (TCG)."""
    return guest.detect_domain_type(image)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Keep each phase's report on the test item (``item.rep_setup``, ``item.rep_call``), so a
    fixture's teardown can tell how its test went (test_faults.py's fault matrix)."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())
