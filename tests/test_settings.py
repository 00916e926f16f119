"""Settings: precedence of the teacher variables and every start-up error."""

from __future__ import annotations

import pytest

from mopd.errors import ConfigError
from mopd.settings import load_settings, resolve_teachers

BASE = {"MOPD_DATA_PATH": "rows.jsonl", "MOPD_STUDENT_MODEL": "student"}


def routes_of(env: dict[str, str]) -> list[str]:
    teachers, _, _ = resolve_teachers(load_settings({**BASE, **env}))
    return [t.route for t in teachers]


def test_distillation_teachers_route_by_model_name() -> None:
    assert routes_of({"DISTILLATION_TEACHERS": "math-teacher, arithmetic-teacher"}) == [
        "math-teacher", "arithmetic-teacher",
    ]


@pytest.mark.parametrize(
    ("env", "expected_source", "expected_routes"),
    [
        pytest.param(
            {"MOPD_TEACHERS": '[{"model": "m1", "route": "r1"}]', "DISTILLATION_TEACHERS": "a,b"},
            "MOPD_TEACHERS", ["r1"], id="mopd-teachers-first",
        ),
        pytest.param(
            {"DISTILLATION_TEACHERS": "a,b", "OPD_TEACHERS": "c"}, "DISTILLATION_TEACHERS", ["a", "b"],
            id="distillation-over-opd",
        ),
        pytest.param(
            {"OPD_TEACHERS": "c,d", "DISTILLATION_TEACHER_MODEL": "e"}, "OPD_TEACHERS", ["c", "d"],
            id="opd-over-single",
        ),
        pytest.param({"DISTILLATION_TEACHER_MODEL": "e"}, "DISTILLATION_TEACHER_MODEL", ["e"], id="single"),
    ],
)
def test_teacher_variable_precedence(env: dict[str, str], expected_source: str, expected_routes: list[str]) -> None:
    teachers, source, shadowed = resolve_teachers(load_settings({**BASE, **env}))
    assert source == expected_source
    assert [t.route for t in teachers] == expected_routes
    assert set(shadowed) == set(env) - {expected_source}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, "teacher", id="default"),
        pytest.param({"OPD_TEACHER_ROUTE_KEY": "legacy"}, "legacy", id="legacy"),
        pytest.param({"OPD_TEACHER_ROUTE_KEY": "legacy", "DISTILLATION_TEACHER_ROUTE_KEY": "dist"}, "dist",
                     id="distillation-over-legacy"),
        pytest.param({"DISTILLATION_TEACHER_ROUTE_KEY": "dist", "MOPD_ROUTE_KEY": "mopd"}, "mopd",
                     id="mopd-first"),
    ],
)
def test_route_key_precedence(env: dict[str, str], expected: str) -> None:
    settings = load_settings({**BASE, "DISTILLATION_TEACHERS": "a", **env})
    assert settings.effective_route_key == expected


def test_teacher_json_fields_are_kept() -> None:
    settings = load_settings({
        **BASE,
        "MOPD_TEACHERS": '[{"model": "/m/t", "route": "r", "messages_key": "hint", "workers": 3, "tokenizer": "/m/tok"}]',
    })
    (teacher,), _, _ = resolve_teachers(settings)
    assert teacher.messages_key == "hint"
    assert settings.teacher_workers_for(teacher) == 3
    assert teacher.tokenizer == "/m/tok"


def test_teacher_workers_default_applies() -> None:
    settings = load_settings({**BASE, "DISTILLATION_TEACHERS": "a", "MOPD_TEACHER_WORKERS": "5"})
    (teacher,), _, _ = resolve_teachers(settings)
    assert settings.teacher_workers_for(teacher) == 5


def test_no_variables_means_demo() -> None:
    assert load_settings({}).is_demo


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        pytest.param({"MOPD_DATA_PATH": "x.jsonl"}, ["no teacher is configured", "DISTILLATION_TEACHERS"],
                     id="no-teacher"),
        pytest.param({"DISTILLATION_TEACHERS": "a"}, ["MOPD_DATA_PATH is not set"], id="no-data"),
        pytest.param({"DISTILLATION_TEACHERS": "a", "MOPD_DATA_PATH": "x"}, ["MOPD_STUDENT_MODEL is not set"],
                     id="no-student"),
        pytest.param({**BASE, "DISTILLATION_TEACHERS": "a,,b"}, ["DISTILLATION_TEACHERS='a,,b'", "position 2"],
                     id="empty-entry"),
        pytest.param({**BASE, "OPD_TEACHERS": "a,b,a"}, ["OPD_TEACHERS", "route 'a'", "remove the duplicate"],
                     id="duplicate-route"),
        pytest.param({**BASE, "MOPD_TEACHERS": '[{"model": "m1", "route": "r"}, {"model": "m2", "route": "r"}]'},
                     ["MOPD_TEACHERS", "route 'r'"], id="duplicate-json-route"),
        pytest.param({**BASE, "DISTILLATION_TEACHER_MODEL": "  "}, ["DISTILLATION_TEACHER_MODEL is set but empty"],
                     id="blank-single"),
        pytest.param({**BASE, "MOPD_TEACHERS": "[]"}, ["MOPD_TEACHERS lists no teacher"], id="empty-json-list"),
        pytest.param({**BASE, "MOPD_TEACHERS": "not json"}, ["MOPD_TEACHERS='not json'"], id="bad-json"),
        pytest.param({**BASE, "MOPD_TEACHERS": '[{"model": "m", "wrokers": 2}]'}, ["MOPD_TEACHERS", "0.wrokers"],
                     id="misspelt-teacher-field"),
        pytest.param({**BASE, "MOPD_TEACHERS": '[{"model": ""}]'}, ["empty model name"], id="empty-model"),
        pytest.param({**BASE, "DISTILLATION_TEACHERS": "a", "DISTILLATION_TEACHER_ROUTE_KEY": " "},
                     ["DISTILLATION_TEACHER_ROUTE_KEY", "route key is empty"], id="blank-route-key"),
        pytest.param({**BASE, "DISTILLATION_TEACHERS": "a", "MOPD_TEMPERATURE": "0"},
                     ["MOPD_TEMPERATURE='0'", "greater than 0"], id="zero-temperature"),
        pytest.param({**BASE, "DISTILLATION_TEACHERS": "a", "MOPD_PROMPT_GROUPS_PER_STEP": "zero"},
                     ["MOPD_PROMPT_GROUPS_PER_STEP='zero'"], id="not-a-number"),
        pytest.param({**BASE, "DISTILLATION_TEACHERS": "a", "MOPD_TEACHER_WORKERS": "0"},
                     ["MOPD_TEACHER_WORKERS='0'"], id="zero-workers"),
    ],
)
def test_startup_error_names_variable(env: dict[str, str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_load_settings_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLATION_TEACHERS", "x,y")
    monkeypatch.setenv("MOPD_DATA_PATH", "d.jsonl")
    monkeypatch.setenv("MOPD_STUDENT_MODEL", "s")
    teachers, source, _ = resolve_teachers(load_settings())
    assert source == "DISTILLATION_TEACHERS"
    assert [t.route for t in teachers] == ["x", "y"]
