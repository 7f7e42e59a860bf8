"""qwen2vl.memory: when the serving engine gives freed memory back (the soak's RSS climb, bench/HISTORY.md)."""

from qwen2vl.memory import IdleTrimmer, trim_heap


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_trims_when_idle_after_work_and_rarely_while_busy():
    clock, calls = Clock(), []
    t = IdleTrimmer(busy_interval=30.0, clock=clock, trim=lambda: calls.append(clock.t))
    t.after_step(idle=True, worked=False)  # idle with nothing done since: nothing to give back
    assert calls == []
    for i in range(10):  # busy for 9 s: no trim
        clock.t = float(i)
        t.after_step(idle=False, worked=True)
    assert calls == []
    clock.t = 9.5
    t.after_step(idle=True, worked=True)  # the step that leaves the engine idle trims
    assert calls == [9.5]
    t.after_step(idle=True, worked=False)  # staying idle does not trim again
    assert calls == [9.5]
    for s in range(10, 80):  # busy for 70 s: once per 30 s
        clock.t = float(s)
        t.after_step(idle=False, worked=True)
    assert calls == [9.5, 40.0, 70.0] and t.trims == 3


def test_busy_interval_off_and_trim_heap_runs():
    clock, calls = Clock(), []
    t = IdleTrimmer(busy_interval=None, clock=clock, trim=lambda: calls.append(1))
    for s in range(100):
        clock.t = float(s)
        t.after_step(idle=False, worked=True)
    assert calls == []
    assert trim_heap() in (True, False)  # glibc here: True; elsewhere a no-op
