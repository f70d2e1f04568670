"""What a front end (the rich progress of the CLI) hears from a sweep, and a listener that hears nothing."""

from __future__ import annotations

from typing import Protocol


class Events(Protocol):
    """What a front end (the rich progress of the CLI) hears from a sweep."""

    def sweep_started(self, device: str, recovered: list[str]) -> None: ...

    def trial_started(self, number: int, epochs: int) -> None: ...

    def epoch_ended(self, number: int, epoch: int, logs: dict[str, float]) -> None: ...

    def trial_ended(self, number: int, state: str, value: float | None, reason: str | None) -> None: ...


class QuietEvents:
    """Events that go nowhere (library use and tests)."""

    def sweep_started(self, device: str, recovered: list[str]) -> None:
        pass

    def trial_started(self, number: int, epochs: int) -> None:
        pass

    def epoch_ended(self, number: int, epoch: int, logs: dict[str, float]) -> None:
        pass

    def trial_ended(self, number: int, state: str, value: float | None, reason: str | None) -> None:
        pass
