"""The plug-in's settings fail fast, naming the key (no vLLM needed)."""

import logging
import os

import pytest

from gds_kvcache.errors import ConfigError
from gds_kvcache.integrations.vllm.settings import library_config


def test_local_disk_that_is_a_file_is_a_config_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError) as ei:
        library_config({"local_disk": str(f), "max_local_disk_size": 1})
    assert ei.value.field == "kv_connector_extra_config.local_disk" and "file" in str(ei.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a read-only directory")
def test_local_disk_not_writable_is_a_config_error(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(ConfigError) as ei:
            library_config({"local_disk": str(d), "max_local_disk_size": 1})
        assert ei.value.field == "kv_connector_extra_config.local_disk"
    finally:
        d.chmod(0o700)


def test_local_disk_on_a_read_only_mount_is_a_config_error(tmp_path):
    import subprocess
    from tests.conftest import mounted_tmpfs
    with mounted_tmpfs(tmp_path / "m", "1m") as mnt:
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")
        with pytest.raises(ConfigError) as ei:
            library_config({"local_disk": os.path.join(mnt, "kv"), "max_local_disk_size": 1})
        assert ei.value.field == "kv_connector_extra_config.local_disk" and "Read-only" in str(ei.value)


def test_unknown_keys_are_warned_naming_them_and_the_known_keys(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gds_kvcache.integrations.vllm.settings"):
        cfg = library_config({"local_disk": str(tmp_path), "max_local_disk_size": 1, "io_thread": 4,
                              "spec_name": "GdsKvCacheSpec"})
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "'io_thread'" in msgs[0] and "did you mean 'io_threads'" in msgs[0]
    assert "local_disk" in msgs[0] and cfg.io_threads != 4
    assert os.listdir(tmp_path) == []            # the write probe leaves nothing behind
