"""The training commands by stage, and the names they had before ``training/`` became packages.

``python -m training`` lists them. A command's old name still runs it (``python -m training.lso run ...``
runs ``python -m training.evaluate.lso run ...``), so every command written in a results README keeps
working; importing an old name raises an ImportError that names the new home (code imports the new
paths; the old modules were split, so an old name has no single module to stand for).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import NamedTuple


class Command(NamedTuple):
    stage: str
    module: str  # python -m MODULE
    old: str | None  # its name before the packages (an alias), if it had another
    what: str


DATA, TRAIN, EVALUATE = "data and sources", "train", "evaluate and leave-source-out"
EXPORT, ONBOARDING = "export", "onboarding studies"
COMMANDS = (
    Command(DATA, "training.data.sources", "training.sources", "many sources -> one manifest with grouped splits"),
    Command(DATA, "training.data.pack", "training.pack", "a manifest's films preprocessed into one small file"),
    Command(TRAIN, "training.train", None, "train a classifier (class-weighted loss, CUDA when there)"),
    Command(TRAIN, "training.train.calibrate", "training.calibrate",
            "temperature and operating points on the validation split"),
    Command(TRAIN, "training.train.lungseg", "training.lungseg", "train the lung-field segmenter"),
    Command(EVALUATE, "training.evaluate", None, "a checkpoint on a split: AUCs with intervals, plots"),
    Command(EVALUATE, "training.evaluate.lso", "training.lso", "leave-source-out: a model per held-out source"),
    Command(EVALUATE, "training.evaluate.frozen", "training.frozen", "the v4 protocol's frozen-feature heads"),
    Command(EVALUATE, "training.evaluate.abnormal", "training.abnormal", "the v5 protocol's abnormal-vs-normal head"),
    Command(EVALUATE, "training.evaluate.ood", "training.ood", "the out-of-domain gate and what the rules refuse"),
    Command(EVALUATE, "training.evaluate.probes", "training.probes", "probe images that are not frontal chest films"),
    Command(EVALUATE, "training.evaluate.explain", "training.explain", "how much Grad-CAM heat falls inside the lungs"),
    Command(EXPORT, "training.export", None, "a calibrated checkpoint made ready for bundling"),
    Command(ONBOARDING, "training.onboarding.calibration", "training.site_onboarding",
            "a site calibration's sensitivity at an unseen site"),
    Command(ONBOARDING, "training.onboarding.abnormal", "training.site_abnormal",
            "how few labels adapt-site may ask for (abnormal axis)"),
)
ALIASES = {c.old: c.module for c in COMMANDS if c.old}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        raise ImportError(f"{self.old} is now {self.new} (python -m {self.old} still runs it; code imports "
                          f"the new path)", name=self.old)

    def get_code(self, fullname: str):
        src = f"import runpy\nrunpy.run_module({self.new!r}, run_name='__main__', alter_sys=True)\n"
        return compile(src, f"<{self.old}: alias of {self.new}>", "exec")

    def is_package(self, fullname: str) -> bool:
        return False


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds an old command name only when no real module has it (it sits last on ``sys.meta_path``)."""

    def find_spec(self, fullname, path=None, target=None):
        new = ALIASES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, new))


def install_aliases() -> None:
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(AliasFinder())


def listing() -> str:
    width = max(len(c.module) for c in COMMANDS)
    lines, stage = ["python -m <command> --help says more; an old name still runs its command.", ""], None
    for c in COMMANDS:
        if c.stage != stage:
            stage = c.stage
            lines += ([""] if lines[-1] else []) + [f"{stage}:"]
        old = f"  (was {c.old})" if c.old else ""
        lines.append(f"  {c.module:<{width}}  {c.what}{old}")
    return "\n".join(lines) + "\n"
