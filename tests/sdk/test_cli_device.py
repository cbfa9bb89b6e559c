"""``edgeward device simulate`` without an identity says how to enrol; kinds and photos."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from edgeward._cli_device import KINDS, bundled_photos, device


def test_simulate_without_identity_says_how_to_enrol(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        device, ["simulate", "--identity", str(tmp_path / "none"), "--kind", "pet_camera"]
    )
    assert result.exit_code != 0
    assert "edgeward enroll" in result.output


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        device, ["simulate", "--identity", str(tmp_path), "--kind", "toaster"]
    )
    assert result.exit_code == 2
    assert "pet_camera" in result.output


def test_bundled_photos_exist_with_their_licences() -> None:
    licences = (bundled_photos("pet_camera")[0].parent / "LICENSES.md").read_text()
    for kind in KINDS:
        for photo in bundled_photos(kind):
            assert photo.stat().st_size > 10_000
            assert f"`{photo.name}`" in licences
