"""Loading a service's configuration: one TOML file, every key overridable from the environment.

``load_settings(Model, path, env_prefix="EDGEWARD_GATEWAY_")`` reads the TOML file, lets
``EDGEWARD_GATEWAY_<KEY>`` (nested keys joined by ``__``, e.g.
``EDGEWARD_GATEWAY_INFERENCE__MAX_BATCH=4``) override any key, validates the result, and on a
problem raises :class:`ConfigError` whose message names each bad key and what is wrong with it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from gateway.errors import ConfigError

__all__ = ["ConfigError", "ServiceSettings", "load_settings"]

S = TypeVar("S", bound="ServiceSettings")


class ServiceSettings(BaseSettings):
    """Base for service settings: unknown keys are errors, every field is documented."""

    model_config = SettingsConfigDict(extra="forbid", env_nested_delimiter="__", frozen=True)


class _TomlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _describe(exc: ValidationError, prefix: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        env = prefix + "__".join(str(p) for p in err["loc"]).upper()
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg} (environment override: {env})")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(
    model: type[S],
    path: Path | None,
    *,
    env_prefix: str,
    overrides: dict[str, Any] | None = None,
) -> S:
    """Read ``path`` (TOML), apply environment and explicit overrides, validate.

    Precedence, highest first: ``overrides`` (command-line flags), environment, file, defaults.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc}") from None

    class _Configured(model):  # type: ignore[valid-type,misc]
        model_config = SettingsConfigDict(env_prefix=env_prefix)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _TomlSource(settings_cls, data))

    unknown = sorted(
        name
        for name in os.environ
        if name.upper().startswith(env_prefix)
        and name[len(env_prefix) :].split("__")[0].lower() not in model.model_fields
    )
    if unknown:
        # pydantic-settings ignores environment variables that name no field; a misspelled
        # override must stop start-up like a misspelled key in the file.
        raise ConfigError(
            "invalid configuration:\n"
            + "\n".join(f"  {name}: unknown key (environment override)" for name in unknown)
        )
    try:
        configured = _Configured(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, env_prefix)) from None
    # Hand back an instance of the caller's own class (frozen, equal field values).
    return model.model_construct(**{k: getattr(configured, k) for k in model.model_fields})
