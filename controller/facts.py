"""What the hosts say about one server, asked with patience and told to an operator.

The conductor acts on facts only (docs/safety.md): when a host does not
answer, it asks again with backoff for up to ``agent_lost_seconds`` of
silence, then gives up with ``HostLost`` and the migration goes to
needs-recovery instead of guessing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential

from agent.schemas import InstanceOut
from driver.model import PowerState

from .agents import AgentClient
from .errors import AgentError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Power states in which a defined server is not running (its disks are not in use).
STOPPED = frozenset({PowerState.SHUTDOWN, PowerState.CRASHED})


class Unsettled(Exception):
    """The migration cannot go on safely now: it goes to needs-recovery with this message."""


class HostLost(Unsettled):
    """A host stayed out of reach past the limit: what it runs and holds is unknown."""

    def __init__(self, host: str, detail: str) -> None:
        self.host = host
        super().__init__(f"{host} did not answer: {detail}")


def no_answer(e: BaseException) -> bool:
    """Whether ``e`` leaves the facts unknown: the agent did not answer, or failed inside (5xx)."""
    return isinstance(e, AgentError) and (e.agent_status is None or e.agent_status >= 500)


class Reach:
    """When the current stretch of unanswered calls to one host began (None: it answers)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.since: float | None = None

    def answered(self) -> None:
        self.since = None

    def missed(self) -> None:
        if self.since is None:
            self.since = self.clock()

    def silent_for(self) -> float:
        return 0.0 if self.since is None else self.clock() - self.since


@dataclass(frozen=True)
class Patience:
    """How long a host may stay silent, and the clock and sleep that pace the asking."""

    limit: float
    interval: float
    clock: Callable[[], float]
    sleep: Callable[[float], None]

    def ask(self, agent: AgentClient, fn: Callable[[AgentClient], T], reach: Reach | None = None) -> T:
        """``fn(agent)``, asked again with backoff while the agent does not answer, until it has
        been silent for ``limit`` seconds (``reach`` may note answers ``fn`` sees on the way).

        :raises HostLost: silent past the limit.
        :raises AgentError: the agent answered with an error (4xx).
        """
        reach = reach or Reach(self.clock)

        def attempt() -> T:
            try:
                out = fn(agent)
            except AgentError as e:
                if no_answer(e):
                    reach.missed()
                    log.warning("host %s does not answer (%s); asking again", agent.host_name, e)
                raise
            reach.answered()
            return out

        def out_of_time(state: RetryCallState) -> bool:
            return reach.silent_for() >= self.limit

        retrying = Retrying(retry=retry_if_exception(no_answer), stop=out_of_time, sleep=self.sleep,
                            wait=wait_exponential(multiplier=self.interval, max=30.0), reraise=True)
        try:
            return retrying(attempt)
        except AgentError as e:
            if no_answer(e):
                raise HostLost(agent.host_name, f"{e} (silent for {reach.silent_for():.0f} s)") from None
            raise


def where(agent: AgentClient, server: str) -> InstanceOut | None | AgentError:
    """One quick look (the client's own retries only): the server there, None, or why unknown."""
    try:
        return agent.instance(server)
    except AgentError as e:
        return e


def describe(role: str, host: str, fact: InstanceOut | None | AgentError) -> str:
    """One host's part of a needs-recovery message, e.g. ``host2 (destination): server defined, running``."""
    if isinstance(fact, AgentError):
        return f"{host} ({role}): unknown, no answer ({fact.reason})"
    if fact is None:
        return f"{host} ({role}): server not defined"
    return f"{host} ({role}): server defined, {PowerState(fact.power_state).label}"
