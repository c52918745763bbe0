"""Settings dataclasses as the one source of the DAG's params and the stages' arguments."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from stages.settings import param_fields, setting, settings_from


@dataclass(frozen=True)
class Inner:
    limit: float = setting(30, type="number", description="seconds")
    networks: list = setting([], type="array")


@dataclass(frozen=True)
class Outer:
    size: int = setting(256, type="integer", minimum=16)
    key: str | None = setting(None, type=["null", "string"])
    mode: str = setting("border", type="string")
    internal: int = 95  # not a param
    inner: Inner = field(default_factory=Inner)


def test_params_are_the_fields_with_a_schema_nested_ones_flattened() -> None:
    assert [f.name for f in param_fields(Outer)] == ["size", "key", "mode", "limit", "networks"]
    assert param_fields(Outer)[0].metadata["param"] == {"description": None, "type": "integer", "minimum": 16}


def test_rendered_values_become_typed_settings_with_defaults_for_the_rest() -> None:
    built = settings_from(Outer, {"size": "512", "key": "None", "limit": 5, "networks": ("127.0.0.0/8",), "unrelated": 1})
    assert built == Outer(size=512, key=None, inner=Inner(limit=5.0, networks=["127.0.0.0/8"]))
    assert settings_from(Outer, {"key": "IVF16,Flat", "networks": "10.0.0.0/8"}).key == "IVF16,Flat"
    assert settings_from(Outer, {"networks": "10.0.0.0/8"}).inner.networks == ["10.0.0.0/8"]
    assert settings_from(Outer, {}) == Outer()


def test_a_value_of_the_wrong_type_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"setting size = 'big': expected int"):
        settings_from(Outer, {"size": "big"})


def test_a_deployment_default_comes_from_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAION_TEST_THREADS", "7")
    monkeypatch.setenv("LAION_TEST_NETWORKS", "127.0.0.0/8,10.0.0.0/8")

    @dataclass(frozen=True)
    class Deployed:
        threads: int = setting(32, env="LAION_TEST_THREADS", type="integer")
        networks: list = setting([], env="LAION_TEST_NETWORKS", type="array")

    assert Deployed() == Deployed(threads=7, networks=["127.0.0.0/8", "10.0.0.0/8"])
    monkeypatch.setenv("LAION_TEST_THREADS", "many")
    with pytest.raises(ValueError, match=r"LAION_TEST_THREADS='many': expected int"):
        setting(32, env="LAION_TEST_THREADS")
