"""The whole run's ETA, from its first unit of work on.

A run is a few phases -- generating preference pairs, the training steps, a final evaluation -- each
counted in its own units (prompts, steps). A phase's seconds per unit are measured once it has done
one; before that they are estimated from the phases already timed through a common measure of work,
the *denoiser image-evaluations* per unit (one network call on one image; a CFG'd call counts 2), which
dominates every phase here. A phase whose work is unknown is named, not guessed ("+ 300 steps, timed
from the first"). The estimate is refined as each phase starts.

    clock = RunClock()
    clock.plan("pairs", 100, work=4 * 20 * 2)   # 100 prompts, 4 samples x 20 CFG steps each
    clock.plan("train", 300)                      # unknown work: timed from its first step
    clock.start("pairs"); ...; clock.advance("pairs", 8)
    clock.eta()  # -> (seconds left over the timed/estimated phases, names of untimed phases)
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Phase:
    units: int  # to do, in all
    work: float | None = None  # denoiser image-evaluations per unit, if known
    done: int = 0
    seconds: float = 0.0
    label: str = "units"


class RunClock:
    def __init__(self, now=time.perf_counter):
        self.phases: dict[str, Phase] = {}
        self.now, self._mark, self._current = now, None, None

    def plan(self, name: str, units: int, work: float | None = None, label: str = "units") -> None:
        """Add (or re-size) a phase; re-planning keeps what was measured."""
        old = self.phases.get(name)
        self.phases[name] = Phase(int(units), work, old.done if old else 0, old.seconds if old else 0.0, label)

    def finish(self, name: str) -> None:
        """A phase that needs no more time (e.g. pairs already cached)."""
        if name in self.phases:
            p = self.phases[name]
            p.units = p.done

    def start(self, name: str) -> None:
        self._current, self._mark = name, self.now()

    def advance(self, name: str, n: int = 1) -> None:
        """``n`` more units of ``name`` done; the time since the last mark is theirs."""
        now = self.now()
        p = self.phases.setdefault(name, Phase(n))
        if self._current == name and self._mark is not None:
            p.seconds += now - self._mark
        p.done += n
        self._current, self._mark = name, now

    def seconds_per_unit(self, name: str) -> float | None:
        p = self.phases[name]
        if p.done:
            return p.seconds / p.done
        timed = [q for q in self.phases.values() if q.done and q.work]
        if p.work and timed:  # seconds per image-evaluation, over what has been timed
            return p.work * sum(q.seconds for q in timed) / sum(q.done * q.work for q in timed)
        return None

    def eta(self) -> tuple[float, list[str]]:
        """-> (seconds left over the phases that can be estimated, names of those that cannot)."""
        left, unknown = 0.0, []
        for name, p in self.phases.items():
            todo = p.units - p.done
            if todo <= 0:
                continue
            rate = self.seconds_per_unit(name)
            if rate is None:
                unknown.append(name)
            else:
                left += todo * rate
        return left, unknown

    def short(self) -> str:
        """``'4 min 10 s'`` (+ the untimed phases) -- a progress-bar postfix."""
        left, unknown = self.eta()
        return duration(left) + "".join(f" + {n}" for n in unknown)

    def describe(self) -> str:
        """One line: the whole run's ETA and each remaining phase's share."""
        left, unknown = self.eta()
        parts = []
        for name, p in self.phases.items():
            todo = p.units - p.done
            if todo <= 0:
                continue
            rate = self.seconds_per_unit(name)
            what = f"{name} {todo} {p.label}"
            parts.append(f"{what} {duration(todo * rate)}" if rate is not None else f"{what} (timed from the first)")
        head = f"~{duration(left)} left" + (" + the untimed phases" if unknown else "")
        return f"ETA for the whole run: {head} ({', '.join(parts)}; refined as it runs)"


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
