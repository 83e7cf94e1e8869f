"""The console sink: step lines always, a progress bar only on a terminal."""

import io
import sys

from nanoseek.train.metrics import ConsoleSink, format_line

RECORD = dict(steps=10, loss=1.25, lr=1e-3, grad_norm=0.5, tok_per_s=1000.0, mfu=0.1, imbalance=None, eta_s=5.0)


def log_ten_steps(every: int) -> None:
    sink = ConsoleSink(total=10, initial=0, every=every)
    for step in range(10):
        sink.log({**RECORD, "step": step})
    sink.close()


def test_redirected_output_gets_only_the_step_lines(capsys):
    log_ten_steps(every=4)  # pytest's captured stderr is not a terminal, as in CI or `> log.txt`
    out, err = capsys.readouterr()
    assert out.splitlines() == [format_line({**RECORD, "step": step}) for step in (3, 7, 9)]
    assert err == ""


def test_a_terminal_gets_the_bar_too(capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    log_ten_steps(every=4)
    out, _ = capsys.readouterr()
    assert out.splitlines() == [format_line({**RECORD, "step": step}) for step in (3, 7, 9)]
    assert "\r" in terminal.getvalue() and "10/10" in terminal.getvalue()
