"""Third-party prints and warnings inside ``quiet()`` reach the terminal only with ``--verbose``."""
import io
import logging
import warnings

import pytest

from bench.quiet import LOGGER, quiet, show_third_party


@pytest.fixture
def restore_logger():
    handlers, level = list(LOGGER.handlers), LOGGER.level
    yield
    LOGGER.handlers[:], LOGGER.level = handlers, level


def chatter():
    print("Using device: cpu")
    print("perform_everything_on_device=True is only supported for cuda devices! Setting this to False")
    warnings.warn("a library warning", UserWarning)


def test_default_quiet(capsys, restore_logger):
    with quiet():
        chatter()
    print("the suite's own line")
    out, err = capsys.readouterr()
    assert out == "the suite's own line\n" and err == ""


def test_verbose_shows_each_line_with_its_source(capsys, restore_logger):
    stream = io.StringIO()
    show_third_party(stream)
    show_third_party(stream)  # idempotent: one handler, each line once
    with quiet():
        chatter()
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["nnU-Net: Using device: cpu", "nnU-Net: perform_everything_on_device=True is only "
                         "supported for cuda devices! Setting this to False"]
    assert len(lines) == 3 and "UserWarning: a library warning" in lines[2]
    assert capsys.readouterr().out == ""
    assert LOGGER.getEffectiveLevel() == logging.DEBUG


def test_warning_filters_are_restored(restore_logger):
    with quiet():
        warnings.simplefilter("ignore")
    with pytest.warns(UserWarning):
        warnings.warn("seen again", UserWarning)


def test_stdout_false_captures_warnings_only(capsys, restore_logger):
    with quiet(stdout=False):
        chatter()
    out, err = capsys.readouterr()
    assert "Using device: cpu" in out and "a library warning" not in out + err
