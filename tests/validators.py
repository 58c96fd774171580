"""The reference validators, run as the real tools: dciodvfy (dicom3tools) and pixelmed's
DicomSRValidator (pixelmed-apps). Both return their Error lines; an empty list means valid."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import require_tool

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")


def dciodvfy_errors(path: Path) -> list[str]:
    exe = require_tool("dciodvfy", "dicom3tools")
    p = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (p.stdout + p.stderr).splitlines()
    if not any(line.strip() for line in lines):
        raise AssertionError(f"dciodvfy printed nothing for {path}")
    return [line for line in lines if line.startswith("Error")]


def pixelmed_sr_errors(path: Path) -> list[str]:
    java = require_tool("java", "default-jre (pixelmed-apps pulls it in)")
    if not PIXELMED_JAR.exists():
        require_tool("pixelmed-jar-missing", "pixelmed-apps")
    p = subprocess.run([java, "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                        "-Djdk.xml.xpathTotalOpLimit=0", "-cp", str(PIXELMED_JAR),
                        "com.pixelmed.validate.DicomSRValidator", str(path)],
                       capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    if "Root Template Validation Complete" not in out and "IOD validation complete" not in out:
        raise AssertionError(f"pixelmed did not validate {path}:\n{out[-2000:]}")
    return [line for line in out.splitlines() if line.lower().startswith("error")]


def saved_valid_sr(sr, path: Path):
    """``sr`` written to ``path`` as Part 10, passed by both validators, and read back."""
    from pydicom import dcmread

    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert pixelmed_sr_errors(path) == []
    return dcmread(path)
