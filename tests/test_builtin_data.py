"""The built-in data's Debian packages, where they cannot be fetched: dyt_data says which packages
and why, and a recipe reports it as its own data error (one line, exit 2; the commands' cases are in
tests/test_bad_input.py)."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from dyt_data import BuiltinDataUnavailable, reported_as, unpack


def _program(folder, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_debian(tmp_path, monkeypatch, apt_get: str, dpkg_deb: str) -> None:
    """``apt-get`` and ``dpkg-deb`` as the given shell scripts, first on PATH; the cache under tmp_path."""
    tools = tmp_path / "bin"
    tools.mkdir()
    _program(tools, "apt-get", apt_get)
    _program(tools, "dpkg-deb", dpkg_deb)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DYT_CACHE", str(tmp_path / "cache"))


def test_a_failed_apt_get_download_names_the_packages_and_apt_gets_reason(tmp_path, monkeypatch):
    _fake_debian(tmp_path, monkeypatch, 'echo "E: Unable to locate package $2" >&2; exit 100', "exit 0")
    with pytest.raises(BuiltinDataUnavailable) as raised:
        unpack(["no-such-package"], "nothing")
    message = str(raised.value)
    assert "no-such-package" in message and "Unable to locate package" in message and "your own data" in message
    assert not (tmp_path / "cache" / "debian" / "nothing" / ".complete").exists()  # a later run tries again


def test_reported_as_turns_it_into_the_recipes_error_and_leaves_others_alone():
    class RecipeDataError(ValueError):
        pass

    with pytest.raises(RecipeDataError, match="apt-get"):
        with reported_as(RecipeDataError):
            raise BuiltinDataUnavailable("no apt-get")
    with pytest.raises(KeyError):
        with reported_as(RecipeDataError):
            raise KeyError("a bug keeps its type")


def test_an_unpacked_folder_names_the_package_versions_it_holds(tmp_path, monkeypatch):
    """Caches built from unpacked packages (the built-in speech) are keyed by the .deb files' names,
    which carry the versions: another version builds anew instead of reusing the old build."""
    from dyt_data import unpacked_versions

    _fake_debian(tmp_path, monkeypatch, 'for p in "$@"; do [ "$p" = download ] || : > "${p}_1.2-3_amd64.deb"; done',
                 'mkdir -p "$3/usr/share"')
    root = unpack(["voice-data", "voice"], "voices")
    assert unpacked_versions(root) == ["voice-data_1.2-3_amd64.deb", "voice_1.2-3_amd64.deb"]


def test_the_built_in_speech_is_rebuilt_for_other_package_versions_and_kept_without_them(tmp_path, monkeypatch):
    """The speech build's key holds the unpacked packages' versions: other versions synthesise anew.
    Where the unpacked packages are gone since, the finished build stands and nothing is fetched."""
    from dyt_data import unpacked_root
    from dyt_wav2vec2 import speech

    monkeypatch.setenv("DYT_CACHE", str(tmp_path / "cache"))
    assert unpacked_root("speech") is None
    root = tmp_path / "cache" / "debian" / "speech"
    root.mkdir(parents=True)
    (root / ".complete").write_text("espeak-ng-data_1.51_amd64.deb\nflite_2.2_amd64.deb")
    made = []
    monkeypatch.setattr(speech, "_synthesize_all", lambda out, *args: out.mkdir(exist_ok=True) or made.append(out))
    out = tmp_path / "speech"
    speech.build(out)
    speech.build(out)
    assert unpacked_root("speech") == root and len(made) == 1
    (root / ".complete").write_text("espeak-ng-data_1.52_amd64.deb\nflite_2.2_amd64.deb")  # a newer voice set
    speech.build(out)
    assert len(made) == 2
    shutil.rmtree(root)
    monkeypatch.setattr(speech, "package_root", lambda: pytest.fail("fetched again"))
    speech.build(out)
    assert len(made) == 2
