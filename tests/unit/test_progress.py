"""Progress in a log file: plain whole lines, no cursor codes, no line per step."""

from __future__ import annotations

import io


def test_log_progress_has_no_cursor_codes_and_no_repeated_lines(monkeypatch):
    from finescope import progress as progress_module

    out = io.StringIO()
    lines = progress_module._LogLines(out)
    lines.write("\rassets:   0%|   | 0/2\n\x1b[A")
    lines.write("\runpack x: 100%|###| 3/3\r")
    lines.write("\runpack x: 100%|###| 3/3\n")
    lines.write("\x1b[A\x1b[2K\n")
    assert out.getvalue() == "assets:   0%|   | 0/2\nunpack x: 100%|###| 3/3\n"


def test_the_fine_tune_bar_writes_no_line_per_step_to_a_log(monkeypatch, capsys):
    """The fine-tune bar shows the loss of every step; in a log that must not redraw the bar each step (it wrote
    a line per step, where the README promises one every 30 s)."""
    import sys
    from types import SimpleNamespace

    from finescope.recover.trainer import _history_callback

    monkeypatch.setenv("FINESCOPE_PROGRESS_INTERVAL", "30")
    monkeypatch.delenv("FINESCOPE_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    trainer = SimpleNamespace(take_step_means=lambda: (1.25, {"ce": 1.25}))
    history: dict = {"train_loss": [], "eval_loss": [], "steps_per_epoch": 50}
    callback = _history_callback(trainer, [], 0, 1, history, 0.0)
    state = SimpleNamespace(max_steps=50, global_step=0, epoch=0.0)
    callback.on_train_begin(None, state, None)
    scheduler = SimpleNamespace(get_last_lr=lambda: [1e-3])
    for step in range(1, 51):
        state.global_step, state.epoch = step, step / 50
        callback.on_step_end(None, state, None, lr_scheduler=scheduler)
    callback.on_train_end(None, state, None)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fine-tune")]
    assert len(lines) <= 3, lines  # the opening line, the closing line (and at most one timed line)
    assert "50/50" in lines[-1] and "loss=1.250" in lines[-1] and len(history["train_loss"]) == 50


def test_the_gguf_loaders_own_bar_is_silent_in_a_log(monkeypatch, capsys):
    """transformers dequantizes a GGUF under a plain tqdm bar (cursor codes, a line per redraw in a log); the
    conversion disables it off a terminal. If transformers renames that attribute, this test says so."""
    import sys

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from finescope.modeling import _quiet_gguf_bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    original = gguf_utils.tqdm
    with _quiet_gguf_bar():
        for _ in gguf_utils.tqdm(range(50), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert gguf_utils.tqdm is original
    assert "Converting" not in capsys.readouterr().err
