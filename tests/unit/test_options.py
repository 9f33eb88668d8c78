"""Settings: typed validation, per-request overrides that change nothing global, atomic persistence."""
import json

import pytest

from modules.core.options import OptionError, Options


def test_defaults_follow_a1111_names(tmp_path):
    opts = Options(tmp_path / "config.json")
    assert opts.get("CLIP_stop_at_last_layers") == 1
    assert opts.get("samples_format") == "png"
    assert opts.get("samples_save") is True
    assert not (tmp_path / "config.json").exists()  # nothing written until something changes


def test_update_persists_and_reloads(tmp_path):
    path = tmp_path / "config.json"
    opts = Options(path)
    changed = opts.update({"CLIP_stop_at_last_layers": 2, "samples_format": "jpg"})
    assert changed == {"CLIP_stop_at_last_layers": 2, "samples_format": "jpg"}
    assert json.loads(path.read_text())["CLIP_stop_at_last_layers"] == 2
    assert Options(path).get("samples_format") == "jpg"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temp files left behind


@pytest.mark.parametrize("update, message", [
    ({"no_such_setting": 1}, "unknown setting"),
    ({"CLIP_stop_at_last_layers": 0}, ">= 1"),
    ({"CLIP_stop_at_last_layers": "two"}, "expects int"),
    ({"samples_format": "bmp"}, "must be one of"),
    ({"samples_save": "maybe"}, "expects bool"),
])
def test_bad_updates_are_rejected_whole(tmp_path, update, message):
    opts = Options(tmp_path / "config.json")
    with pytest.raises(OptionError, match=message):
        opts.update({"CLIP_stop_at_last_layers": 3, **update})
    assert opts.get("CLIP_stop_at_last_layers") == 1  # the valid part was not applied either


def test_server_paths_are_read_only_over_the_api(tmp_path):
    opts = Options(tmp_path / "config.json")
    with pytest.raises(OptionError, match="cannot be changed over the API"):
        opts.update({"outdir_samples": "/etc"}, from_api=True)
    assert opts.get("outdir_samples") == ""


def test_overrides_are_a_copy(tmp_path):
    opts = Options(tmp_path / "config.json")
    view = opts.with_overrides({"CLIP_stop_at_last_layers": 2})
    assert view["CLIP_stop_at_last_layers"] == 2
    assert opts.get("CLIP_stop_at_last_layers") == 1


def test_unknown_keys_in_an_old_config_are_kept(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"some_extension_setting": "x", "CLIP_stop_at_last_layers": 2}))
    opts = Options(path)
    assert opts.get("CLIP_stop_at_last_layers") == 2
    opts.update({"samples_save": False})
    assert json.loads(path.read_text())["some_extension_setting"] == "x"


def test_corrupt_config_falls_back_to_defaults_without_losing_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    opts = Options(path)
    assert opts.get("CLIP_stop_at_last_layers") == 1
    assert path.read_text() == "{not json"


def test_frozen_settings(tmp_path):
    opts = Options(tmp_path / "config.json", frozen=True)
    with pytest.raises(OptionError, match="frozen"):
        opts.update({"samples_save": False})


def test_listeners_see_changes(tmp_path):
    seen = []
    opts = Options(tmp_path / "config.json")
    opts.add_listener(seen.append)
    opts.update({"vram_budget_mb": 1024})
    assert seen == [{"vram_budget_mb": 1024}]
