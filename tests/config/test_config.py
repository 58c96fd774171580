"""Configuration: validated once, errors name the key and the rule, the sample documents defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from conftest import REPO, cli

from cxr_node import config as cfg
from cxr_node.errors import ConfigError


def _parse(text: str, base: Path = Path("/etc/cxr")):
    return cfg.parse(tomllib.loads(text), base_dir=base)


def test_sample_config_documents_every_default():
    raw = tomllib.loads((REPO / "config" / "cxr-node.toml").read_text())
    defaults = cfg.schema_defaults()
    defaults["storage"]["data_dir"] = "../var"  # the sample keeps data next to the checkout
    assert raw == defaults


def test_defaults_and_relative_paths_resolve_against_the_config_file():
    s = _parse('[storage]\ndata_dir = "data"\n', base=Path("/srv/cxr"))
    assert s.storage.data_dir == Path("/srv/cxr/data")
    assert s.database.url == "sqlite:////srv/cxr/data/cxr-node.db"
    assert s.node.ae_title == "CXRNODE" and s.node.port == 11112 and s.node.max_pdu == 131072
    assert s.node.allowed_calling_aets == () and s.node.allowed_hosts == ()


@pytest.mark.parametrize("text, key, rule", [
    ("[node]\nport = 70000", "[node] port", "integer from 1 to 65535"),
    ("[node]\nae_title = \"A_VERY_LONG_AE_TITLE\"", "[node] ae_title", "1 to 16 characters"),
    ("[node]\nallowed_hosts = [\"10.0.0.0/33\"]", "[node] allowed_hosts", "CIDR"),
    ("[node]\nbogus = 1", "[node] bogus", "unknown key"),
    ("[study]\nquiet_seconds = 0", "[study] quiet_seconds", "number from 0.1"),
    ("[extra]\nx = 1", "[extra]", "unknown section"),
    ("[[destinations]]\nname = \"p\"\nae_title = \"P\"\nhost = \"h\"", "[[destinations]] #1 port", "is required"),
    ("[[destinations]]\nname = \"p\"\nae_title = \"P\"\nhost = \"h\"\nport = 1\n"
     "[[destinations]]\nname = \"p\"\nae_title = \"Q\"\nhost = \"h\"\nport = 2", "[[destinations]] #2 name", "unique"),
    ("[onboarding]\nnew_stations = \"silent\"", "[onboarding] new_stations", "must be one of active, shadow"),
    ("[onboarding]\ndrift_window = 20\ndrift_min_films = 50", "[onboarding] drift_min_films", "must not exceed"),
    ("[[stations]]\nae_title = \"CR1\"\nname = \"room 1\"\nmode = \"quiet\"", "[[stations]] #1 mode",
     "must be one of active, shadow"),
    ("[[stations]]\nae_title = \"CR1\"\nname = \"a\"\nmode = \"shadow\"\n"
     "[[stations]]\nae_title = \"CR1\"\nname = \"b\"\nmode = \"active\"", "[[stations]] #2 ae_title",
     "add station_name or institution_name"),
])
def test_invalid_values_name_the_key_and_the_rule(text, key, rule):
    with pytest.raises(ConfigError) as e:
        _parse(text)
    assert key in str(e.value) and rule in str(e.value)


def test_check_config_cli(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[node]\nae_title = "TRIAGE1"\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n')
    out = cli("check-config", config=good).stdout
    assert "configuration OK" in out and "TRIAGE1" in out and "pacs: PACS@127.0.0.1:4242" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = \"eleven\"\n")
    p = cli("check-config", config=bad, check=False)
    assert p.returncode == 2 and "[node] port: must be an integer" in p.stderr
    # CXR_NODE_CONFIG is honoured when --config is absent
    p = cli("check-config", check=False, env={"CXR_NODE_CONFIG": str(bad)})
    assert p.returncode == 2 and "bad.toml" in p.stderr
    p = cli("check-config", check=False, env={"CXR_NODE_CONFIG": str(tmp_path / "missing.toml")})
    assert p.returncode == 2 and "config file not found" in p.stderr


def test_stations_resolve_by_calling_ae_title_then_station_and_institution_name():
    from cxr_node.onboarding import stations

    s = _parse('[onboarding]\nnew_stations = "shadow"\n'
               '[[stations]]\nae_title = "CR1"\nname = "cr1"\nmode = "active"\n'
               '[[stations]]\nae_title = "CR1"\nname = "cr1-er"\nmode = "shadow"\nstation_name = "ER"\n')
    assert stations.resolve(s, "CR1", "ward", None) == stations.StationRef("cr1", "CR1", "active", True)
    assert stations.resolve(s, "CR1", " er ", None).name == "cr1-er"  # the more specific entry, any case
    assert stations.resolve(s, "NEWONE", None, None) == stations.StationRef("NEWONE", "NEWONE", "shadow", False)
    assert stations.resolve(_parse(""), "X", None, None).mode == "active"  # the default for new stations


def test_check_config_names_the_stations(tmp_path, capsys):
    from cxr_node.cli import main

    f = tmp_path / "c.toml"
    f.write_text('[onboarding]\nnew_stations = "shadow"\n[[stations]]\nae_title = "CR1"\nname = "cr1-er"\n'
                 'mode = "active"\nstation_name = "ER"\n')
    assert main(["--config", str(f), "check-config"]) == 0
    out = capsys.readouterr().out
    assert "station     cr1-er: calling AE CR1 (StationName ER), active" in out
    assert "new station shadow (stations not listed in [[stations]])" in out


def test_a_local_file_extends_the_shipped_one_without_touching_it(tmp_path):
    """config/local.toml (git-ignored) holds a site's changes over config/cxr-node.toml: sections
    merge key by key, its [[destinations]] replace the base's, and a relative path keeps the
    meaning it had in the file that wrote it."""
    shipped = tmp_path / "config" / "cxr-node.toml"
    shipped.parent.mkdir()
    shipped.write_text('[storage]\ndata_dir = "../var"\n[node]\nport = 11112\nmax_associations = 4\n'
                       '[model]\ncheckpoint = "bundled:v2"\n'
                       '[[destinations]]\nname = "old"\nae_title = "OLD"\nhost = "h"\nport = 1\n')
    site = tmp_path / "elsewhere" / "local.toml"
    site.parent.mkdir()
    site.write_text(f'extends = "{shipped}"\n[node]\nport = 11113\n[model]\nlung_checkpoint = "lungs.pt"\n'
                    '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "pacs"\nport = 4242\n')
    s = cfg.load(site)
    assert s.node.port == 11113 and s.node.max_associations == 4  # merged key by key
    assert s.storage.data_dir == tmp_path / "var"  # the shipped file's "../var", from its own directory
    assert s.model.lung_checkpoint == site.parent / "lungs.pt"  # the local file's, from its directory
    assert s.model.checkpoint == cfg.BUNDLED_MODELS["v2"]  # a bundled model by name is a name, not a path
    assert [d.name for d in s.destinations] == ["pacs"]  # the list is replaced
    assert s.source == site and s.extends == (shipped,)
    out = cli("check-config", config=site).stdout
    assert out.splitlines()[0] == f"configuration OK: {site} (over {shipped})"

    site.write_text('extends = "local.toml"\n')
    with pytest.raises(ConfigError, match="circle"):
        cfg.load(site)
    site.write_text('extends = "missing.toml"\n')
    with pytest.raises(ConfigError, match="missing.toml is not a file"):
        cfg.load(site)


def test_the_local_example_is_what_make_run_starts_with():
    s = cfg.load(REPO / "config" / "local.example.toml")
    assert s.extends == ((REPO / "config" / "cxr-node.toml").resolve(),)
    assert s.node.host == "127.0.0.1" and s.storage.data_dir == REPO / "var"
    assert "config/local.toml" in (REPO / ".gitignore").read_text().splitlines()


def test_check_config_prints_whole_lines_in_order_through_a_pipe(tmp_path):
    """`check-config 2>&1 | cat`: the settings, then each warning, every line ending in a newline."""
    import subprocess

    from conftest import PY

    f = tmp_path / "c.toml"
    f.write_text("")
    p = subprocess.run([PY, "-m", "cxr_node", "--config", str(f), "check-config"], cwd=REPO, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    lines = p.stdout.split("\n")
    assert p.stdout.endswith("\n") and lines.index("  destination none") < min(
        i for i, x in enumerate(lines) if x.startswith("cxr-node: warning:"))
    assert all(x.startswith(("configuration OK", "  ", "cxr-node: warning: ")) for x in lines if x), lines
