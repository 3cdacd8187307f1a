"""What idle workers do instead of accepting: their main threads' stacks, asked through the scoreboard.

While a listener's queue goes unserved (see lifecycle.UnservedWatch), the master asks each ready worker the
question ``gunicorn-insight stacks`` asks (STACKS_ASKED in its slot: no signal, nothing in the worker
waits); the worker's watchdog thread answers with its threads' stacks, the main thread's included. The
answers are read a round later and put into the master's one error line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _scoreboard as sb
from .._runfiles import read_stacks_answer

ANSWER_WAIT = 3.0
"""Seconds a worker's watchdog gets to answer for its main thread (as `gunicorn-insight stacks` waits)."""
FRAMES = 12
"""Innermost frames of each main thread in the line: where it is blocked, not how gunicorn started it."""
ASK_EVERY = 1.0
"""Seconds between two questions to one worker while a queue goes unserved: its answer stays fresh."""


@dataclass(slots=True)
class _Question:
    """The master's question for one worker's stacks during an unserved episode."""

    pid: int
    number: int
    """The first question's number: an answer to it or to a later one is this episode's."""
    first: float
    last: float


class MainThreadQuestions:
    """The questions of one unserved episode, per slot, and the text of their answers."""

    def __init__(self, board: sb.Scoreboard, run_dir: str, connections_limit: int) -> None:
        self._board = board
        self._run_dir = run_dir
        self._connections_limit = connections_limit
        self._questions: dict[int, _Question] = {}

    def clear(self) -> None:
        """The episode is over: the next one asks again."""
        self._questions.clear()

    def ask(self, now: float, views: list[sb.SlotView]) -> None:
        """Bump each ready worker's STACKS_ASKED, once a second."""
        for view in views:
            if view.state != sb.READY:
                continue  # its watchdog starts once the application is loaded
            question = self._questions.get(view.index)
            if question is None or question.pid != view.pid:
                self._questions[view.index] = _Question(view.pid, self._board.ask_stacks(view.index), now, now)
            elif now - question.last >= ASK_EVERY:
                self._board.ask_stacks(view.index)
                question.last = now

    def answers(self, now: float, views: list[sb.SlotView]) -> tuple[dict[int, dict[str, Any]], bool]:
        """slot -> its watchdog's latest answer in this episode; and whether one is still worth waiting for."""
        answers = {}
        waiting = False
        for view in views:
            question = self._questions.get(view.index)
            if question is None or question.pid != view.pid:
                continue
            answer = read_stacks_answer(self._run_dir, view.index, view.pid, question.number)
            if answer is not None:
                answers[view.index] = answer
            elif now - question.first < ANSWER_WAIT:
                waiting = True
        return answers, waiting

    def describe(self, now: float, views: list[sb.SlotView], answers: dict[int, dict[str, Any]]) -> str:
        """Per worker, what it is doing instead of accepting; workers with the same main-thread stack share it."""
        groups: dict[str, list[str]] = {}
        for view in views:
            head = (
                f"slot={view.index} pid={view.pid} connections={view.connections_now}/{self._connections_limit}"
                f" served={view.served}"
            )
            groups.setdefault(self._doing(now, view, answers.get(view.index)), []).append(head)
        return "\n".join(f"  {'; '.join(heads)}: {doing}" for doing, heads in groups.items())

    def _doing(self, now: float, view: sb.SlotView, answer: dict[str, Any] | None) -> str:
        if view.state == sb.BOOTING:
            return f"still booting (loading the application) for {now - view.spawned:.1f}s"
        if answer is None:
            question = self._questions.get(view.index)
            asked = now - question.first if question is not None and question.pid == view.pid else 0.0
            return (
                f"no answer from its watchdog thread in {asked:.1f}s: the worker is most likely stuck in C code "
                "that holds the GIL, stopped (SIGSTOP, a debugger), or starved of CPU; py-spy dump --native "
                f"--pid {view.pid} can see C frames"
            )
        main = answer.get("main_thread")
        if not isinstance(main, dict):
            return "its watchdog answered without the main thread's stack (an older gunicorn-insight)"
        frames = main.get("stack") or []
        if not frames:
            return f"main thread: ({main.get('note') or 'no Python frame'})"
        lines = ["main thread, most recent call last:"]
        if len(frames) > FRAMES:
            lines.append(f"    ... {len(frames) - FRAMES} outer frames")
        for frame in frames[-FRAMES:]:
            lines.append(f'    File "{frame.get("file")}", line {frame.get("line")}, in {frame.get("function")}')
            if frame.get("code"):
                lines.append(f"      {frame['code']}")
        return "\n".join(lines)
