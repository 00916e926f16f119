"""The environment-variable reference generated from the settings model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mopd import envdocs
from mopd.cli import main
from mopd.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def test_committed_docs_match_settings() -> None:
    stale = envdocs.stale_files(REPO)
    assert stale == [], f"{[str(p) for p in stale]} differ from mopd.settings; run `mopd env-docs --write`"


def test_every_env_name_documented() -> None:
    doc = (REPO / envdocs.DOC_PATH).read_text(encoding="utf-8")
    readme = (REPO / envdocs.README_PATH).read_text(encoding="utf-8")
    for field, info in Settings.model_fields.items():
        for name in envdocs.env_names(field, info):
            assert f"`{name}`" in doc, f"{name} missing from {envdocs.DOC_PATH}"
            assert f"`{name}`" in readme, f"{name} missing from {envdocs.README_PATH}"


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        pytest.param("route_key", ("MOPD_ROUTE_KEY", "DISTILLATION_TEACHER_ROUTE_KEY", "OPD_TEACHER_ROUTE_KEY"),
                     id="route-key-fallbacks"),
        pytest.param("opd_teachers", ("OPD_TEACHERS",), id="legacy-teachers"),
        pytest.param("max_tokens", ("MOPD_MAX_TOKENS",), id="prefixed"),
    ],
)
def test_env_names_include_legacy_aliases(field: str, expected: tuple[str, ...]) -> None:
    assert envdocs.env_names(field, Settings.model_fields[field]) == expected


def test_document_shows_default_and_description() -> None:
    doc = envdocs.render_document()
    line = next(line for line in doc.splitlines() if line.startswith("| `MOPD_MAX_TOKENS` |"))
    assert "`32`" in line
    assert Settings.model_fields["max_tokens"].description in line
    assert "| `MOPD_ROUTE_KEY`<br>fallbacks: `DISTILLATION_TEACHER_ROUTE_KEY`, `OPD_TEACHER_ROUTE_KEY` |" in doc


def copy_docs(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / envdocs.DOC_PATH, tmp_path / envdocs.DOC_PATH)
    shutil.copy(REPO / envdocs.README_PATH, tmp_path / envdocs.README_PATH)
    envdocs.write_files(tmp_path)
    return tmp_path


def test_changed_description_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_docs(tmp_path)
    monkeypatch.setattr(Settings.model_fields["max_tokens"], "description", "Changed.")
    assert envdocs.stale_files(root) == [root / envdocs.DOC_PATH]


def test_edited_readme_table_detected(tmp_path: Path) -> None:
    root = copy_docs(tmp_path)
    readme = root / envdocs.README_PATH
    readme.write_text(readme.read_text().replace("| `MOPD_MAX_TOKENS` | `32` |\n", ""))
    assert envdocs.stale_files(root) == [readme]


def test_write_then_check_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_docs(tmp_path)
    (root / envdocs.DOC_PATH).write_text("out of date\n")
    assert main(["env-docs", "--check", "--root", str(root)]) == 1
    assert "run `mopd env-docs --write`" in capsys.readouterr().err

    assert main(["env-docs", "--write", "--root", str(root)]) == 0
    assert main(["env-docs", "--check", "--root", str(root)]) == 0


def test_readme_without_markers_rejected() -> None:
    with pytest.raises(ValueError, match="no generated variable table"):
        envdocs.replace_readme_block("# README\n")
