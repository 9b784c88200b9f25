"""Plain progress lines for a log (proximal.progress): when they come and what they say."""

import pytest

import proximal.progress as progress_module
from proximal.progress import LogLines, progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    monkeypatch.setattr(progress_module, "LOG_EVERY_SECONDS", 30.0)
    return clock


def test_a_line_comes_at_most_every_30_seconds_with_the_figures(clock, capsys):
    lines = LogLines(total=18, desc="ppo", unit="step", initial=2)  # resumed at step 2
    for seconds in (10.0, 29.9):
        clock.now = 1000.0 + seconds
        lines.update()
    assert capsys.readouterr().err == ""  # 29.9 s: not yet
    lines.set_postfix(score="0.41", kl="0.52", refresh=False)
    clock.now = 1000.0 + 90.0
    lines.update()  # 3 steps done this run in 90 s
    assert capsys.readouterr().err == "ppo: 5/18 steps, 1m30s, 30.0 s/step, score=0.41, kl=0.52\n"
    clock.now += 29.0
    lines.update(4)
    assert capsys.readouterr().err == ""  # 29 s after the last line
    clock.now += 1.0
    lines.update(0)
    assert capsys.readouterr().err == "ppo: 9/18 steps, 2m00s, 17.1 s/step, score=0.41, kl=0.52\n"


def test_a_fast_stage_says_its_rate_per_second(clock, capsys):
    with LogLines(total=1024, desc="reward: sampling pairs", unit="sample") as lines:
        clock.now += 32.0
        lines.update(128)
    assert capsys.readouterr().err == "reward: sampling pairs: 128/1024 samples, 32s, 4.0 sample/s\n"


def test_a_terminal_gets_the_bar_a_log_the_lines_a_library_call_nothing(monkeypatch):
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: False)
    assert isinstance(progress(10, "sft", shown=True), LogLines)
    assert progress(10, "sft", shown=False).disable
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: True)
    bar = progress(10, "sft", shown=True)
    assert not isinstance(bar, LogLines) and not bar.disable
    bar.close()
