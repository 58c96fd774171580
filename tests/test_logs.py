"""cxr_node/logs.py: library warnings in the log say nothing a dataset holds, and only what an admin can use."""

from __future__ import annotations

import logging
import warnings

from cxr_node import logs


def _warn_from(module: str, text: str) -> None:
    # a warning as a library raises it: the module and file name of its caller are the library's
    exec(compile(f"import warnings\nwarnings.warn({text!r}, UserWarning)", f"/x/{module.replace('.', '/')}.py",
                 "exec"), {"__name__": module})


def test_library_warnings_are_dropped_when_useless_and_said_once_otherwise(caplog):
    logs.configure("DEBUG")
    logs._library_warnings_seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for module, message in logs.IGNORED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, module=module)
        with caplog.at_level(logging.DEBUG, logger="py.warnings"):
            warnings.showwarning = logs._show_warning
            _warn_from("highdicom.sc.sop", 'The string "ward" is unlikely to represent the intended person name '
                       "since it contains only a single component.")
            assert not caplog.records  # the person-name check of a copied value: dropped
            for _ in range(3):
                _warn_from("highdicom.sr.value_types", 'The value "Smith John" looks odd')
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG], caplog.text
    assert "later ones from there at DEBUG" in caplog.records[0].getMessage()
    assert "Smith" not in caplog.text and "ward" not in caplog.text
