"""Every configuration error names the file, the key, the bad value and what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootd import config
from bootd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "bootd.toml"
    path.write_text(text)
    return config.load(path)


def test_example_config_is_valid_and_documents_every_key() -> None:
    cfg = config.load(ROOT / "conf" / "bootd.toml")
    assert cfg.server.address == "10.77.0.1"
    assert cfg.http.public_url == "http://10.77.0.1:8080"
    text = (ROOT / "conf" / "bootd.toml").read_text()
    for section, values in cfg.as_dict().items():
        if not isinstance(values, dict):
            continue
        for key in values:
            assert key in text, f"conf/bootd.toml does not mention {section}.{key}"


def test_upstream_and_sources(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[capsule]\nupstream = "http://10.0.0.1:8080/"\n[boot]\n'
                              'sources = ["http://10.0.0.2:8080/", "http://10.0.0.3", "http://10.0.0.2:8080"]\n')
    assert cfg.capsule.upstream == "http://10.0.0.1:8080"
    assert cfg.boot.sources == ("http://10.0.0.2:8080", "http://10.0.0.3")
    assert load_text(tmp_path, "").capsule.upstream == ""


def test_defaults_derive_paths_from_state_dir(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[server]\nstate_dir = "/srv/boot"\n')
    assert cfg.tftp.root == Path("/srv/boot/tftp")
    assert cfg.capsule.dir == Path("/srv/boot/capsules")
    assert cfg.boot.stage1_dir == Path("/srv/boot/stage1")
    assert cfg.db_path == Path("/srv/boot/bootd.sqlite")


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[dhcp]\nport = 70000\n", "dhcp.port", "integer from 0 to 65535"),
        ('[dhcp]\nport = "67"\n', "dhcp.port", "expected an integer"),
        ('[dhcp]\nmode = "relay"\n', "dhcp.mode", "full, proxy"),
        ('[server]\naddress = "10.0.0.300"\n', "server.address", "IPv4 address"),
        ('[dhcp]\npool_strat = "10.0.0.1"\n', "dhcp.pool_strat", "unknown key"),
        ('[dhcp]\nenabled = true\nmode = "full"\n', "dhcp.pool_start", "needs pool_start"),
        ('[dhcp]\nenabled = true\npool_start = "10.0.0.9"\npool_end = "10.0.0.1"\n', "dhcp.pool_end", "below"),
        ('[registry]\nname_pattern = "node"\n', "registry.name_pattern", "{index}"),
        ('[registry]\nname_pattern = "n{idx}"\n', "registry.name_pattern", "format string"),
        ("[registry]\nstale_after = 100\ndead_after = 50\n", "registry.dead_after", "greater than"),
        ('[server]\nlog_level = "loud"\n', "server.log_level", "debug, info"),
        ("[tftp]\nmax_blksize = 70000\n", "tftp.max_blksize", "512 to 65464"),
        ('[http]\npublic_url = "ftp://x"\n', "http.public_url", "http://"),
        ("[capsule]\nchunk_min = 4096\nchunk_avg = 1024\n", "capsule.chunk_avg", "chunk_min < chunk_avg"),
        ('[capsule]\nchunk_cut = "files"\n', "capsule.chunk_cut", "members, stream"),
        ('[dhcp]\ndns = ["1.1.1.1", 5]\n', "dhcp.dns", "IPv4"),
        ("[dhcpd]\n", "dhcpd", "unknown section"),
        ("[server]\ngraceful_timeout = true\n", "server.graceful_timeout", "expected a number"),
        ('[store]\nurl = "mysql://db/bootd"\n', "store.url", "postgresql://"),
        ('[store]\nurl = "postgresql://bootd:hunter2@db/bootd"\n', "store.url", "store.password_file"),
        ('[store]\nurl = "postgresql://db/bootd?password=hunter2"\n', "store.url", "holds a password"),
        ("[store]\npool_size = 0\n", "store.pool_size", "1 to 1000"),
        ('[http]\ntrusted = ["10.0.0.0/33"]\n', "http.trusted", "10.0.0.0/33"),
        ('[http]\ntrusted = "10.0.0.1"\n', "http.trusted", "a list of IP addresses or networks"),
        ("[http]\nheader_timeout = 0\n", "http.header_timeout", "number from 0.1 to 3600"),
        ("[http]\nmax_connections_per_source = 0\n", "http.max_connections_per_source", "integer from 1"),
        ("[http]\nmax_header_bytes = 100\n", "http.max_header_bytes", "integer from 1024"),
        ("[tftp]\nmax_client_timeout = 0.5\n", "tftp.max_client_timeout", "number from 1 to 255"),
        ("[tftp]\nmax_sessions_per_source = 0\n", "tftp.max_sessions_per_source", "integer from 1"),
        ('[capsule]\nupstream = "https://10.0.0.1"\n', "capsule.upstream", "base URL such as http://"),
        ('[capsule]\nupstream = "http://10.0.0.1:99999"\n', "capsule.upstream", "bad port"),
        ('[capsule]\nupstream = "http://10.0.0.1/?x=1"\n', "capsule.upstream", "no query"),
        ("[capsule]\nupstream_connections = 0\n", "capsule.upstream_connections", "integer from 1 to 1000"),
        ("[capsule]\nupstream_timeout = 0\n", "capsule.upstream_timeout", "number from 1 to 3600"),
        ('[boot]\nsources = "http://a"\n', "boot.sources", "a list of base URLs"),
        ('[boot]\nsources = ["http://a", "ftp://b"]\n', "boot.sources", "'ftp://b' is not valid"),
    ],
)
def test_errors_name_file_key_and_valid_values(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "bootd.toml") + ": " + key + ": "), message
    assert fragment in message
    assert info.value.key == key
    assert "hunter2" not in message


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_text(tmp_path, "[server\n")


def test_env_var_names_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.toml"
    path.write_text('[server]\naddress = "10.1.2.3"\n')
    monkeypatch.setenv("BOOTD_CONFIG", str(path))
    assert config.load().server.address == "10.1.2.3"
