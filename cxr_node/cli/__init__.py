"""The ``cxr-node`` command line: parse, call, print. Nothing heavy is imported up front.

One module per command group (``serve``, ``db``, ``check-config``, ``status``, ``studies``, ``echo``,
``audit``, ``outbox``, ``retention``, ``triage``, ``resend``/``reprocess``, ``web``, ``user``, ``feedback``,
``performance``, ``calibrate-site``, ``adapt-site``, ``conformance``); each registers its
parser and a ``run(settings, args, out) -> int``. Commands that use the database open it with
:func:`cxr_node.cli._db.open_database`, which never creates one (only ``db upgrade`` does).

Global options (``--config``, ``--log-level``) go before or after the command:
``cxr-node --config F serve`` and ``cxr-node serve --config F`` are the same.

Exit codes: 0 success, 1 an operation failed (the message says why), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Sequence

from cxr_node import __version__
from cxr_node.errors import ConfigError, CxrNodeError

log = logging.getLogger("cxr_node")

#: The command modules, in the order ``--help`` lists them.
_MODULES = ("serve", "web", "user", "db", "check_config", "status", "studies", "echo", "audit", "outbox", "results", "retention",
            "triage", "feedback", "performance", "calibrate_site", "adapt_site", "conformance")

EPILOG = """\
global options --config and --log-level go before or after the command.
configuration: --config FILE or the CXR_NODE_CONFIG environment variable names a TOML file;
config/cxr-node.toml documents every key; a site's own file (make run: config/local.toml) holds only what
differs, starting with extends = "cxr-node.toml". Without either, built-in defaults apply.

examples:
  cxr-node --config config/local.toml db upgrade
  cxr-node serve --config config/local.toml
  cxr-node echo --to pacs
  cxr-node audit --since 2026-11-01 --event instance.stored --format csv
  cxr-node audit verify
  cxr-node studies --limit 5
  cxr-node audit study 1.3.6.1.4.1.5962.1.2.9.20040826185059.5457
  cxr-node resend 1.3.6.1.4.1.5962.1.2.9.20040826185059.5457 --to pacs
  cxr-node reprocess --since 2026-11-20
  cxr-node triage film.dcm --overlay-dir overlays/
  cxr-node user add alice --role radiologist
  cxr-node web --config config/local.toml
  cxr-node feedback import labels.csv
  cxr-node performance --station CR_ROOM1 --out perf/
  cxr-node calibrate-site --station CR_ROOM1 --dry-run
  cxr-node adapt-site --station CR_ROOM1 --dry-run
  cxr-node conformance > docs/conformance.md
"""


def global_options() -> argparse.ArgumentParser:
    """The options every command accepts, before or after its name. Their defaults are SUPPRESS so
    that a value given before the command is not reset by the subcommand's parser."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options (before or after the command)")
    g.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="TOML config file (default: $CXR_NODE_CONFIG, else built-in defaults)")
    g.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
                   default=argparse.SUPPRESS, help="override [logging] level for this run")
    return p


def build_parser() -> argparse.ArgumentParser:
    import importlib

    common = global_options()
    p = argparse.ArgumentParser(
        prog="cxr-node",
        description="PACS companion daemon: receives chest X-rays over DICOM, triages them, "
        "and sends results back to the PACS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    p.add_argument("--version", action="version", version=f"cxr-node {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _MODULES:
        importlib.import_module(f"cxr_node.cli.{name}").register(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cxr_node import config as cfgmod
    from cxr_node.logs import configure

    try:
        settings = cfgmod.load(cfgmod.config_path_from(getattr(args, "config", None)))
    except ConfigError as e:
        print(f"cxr-node: invalid configuration: {e}", file=sys.stderr)
        return 2
    configure(getattr(args, "log_level", None) or settings.logging.level)
    try:
        return args.run(settings, args, sys.stdout)
    except ConfigError as e:
        _error(e)
        return 2
    except CxrNodeError as e:
        _error(e)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `cxr-node audit | head`
        sys.stderr.close()
        return 0


def _error(e: Exception) -> None:
    """What the command printed so far first (whole lines, even through `2>&1 | cat`), then why it failed."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    print(f"cxr-node: {e}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
