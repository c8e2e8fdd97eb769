"""Settings from options, the environment (CREDEX_*) and defaults."""

from __future__ import annotations

import getpass
import re
from decimal import Decimal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


MAX_PURCHASE_RATE = 1_000_000  # points per 1.00 spent
# The most seconds a carrier timeout may name: a call (retries included) or one wait that takes
# longer than an hour is a hang by another name, and `track sync` runs from cron.
MAX_CARRIER_SECONDS = 3600
# Numbers as cli.md's input rules write them: ASCII digits, no exponent, no underscores, no NaN or
# infinity, no full-width digits (the rules' amounts, with any number of decimals for a setting).
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
_WHOLE = re.compile(r"[+-]?[0-9]+")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CREDEX_", extra="ignore")

    database_url: str = "sqlite:///credex.db"
    warehouse_database_url: str | None = None
    operator: str = Field(default_factory=_login_name)

    purchase_rate: Decimal = Field(default=Decimal(1), ge=0, le=MAX_PURCHASE_RATE, decimal_places=6)
    review_points: int = Field(default=10, ge=1, le=2**63 - 1)
    review_photo_points: int = Field(default=20, ge=1, le=2**63 - 1)
    pending_days: int = Field(default=0, ge=0, le=36500)
    expiry_days: int = Field(default=0, ge=0, le=36500)

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/%2F")
    amqp_prefix: str = ""
    # Seconds a worker waits for the broker to confirm what it published before it takes the
    # connection for lost and reconnects (what was not confirmed is published again). The same
    # as credex.amqp.connection.RPC_TIMEOUT_S, a Broker's own default (a test keeps them equal).
    amqp_publish_timeout: float = Field(default=30.0, gt=0, le=3600)

    logistics_url: str | None = None
    logistics_api_key: SecretStr | None = None
    logistics_provider: str = "generic"
    kuaidi100_customer: str | None = None
    kuaidi100_key: SecretStr | None = None
    # The carrier code `track --express-no` assumes when --carrier is not given.
    logistics_carrier: str | None = None
    # Seconds: one carrier call, retries included, gives up after the total (exit 69).
    logistics_total_timeout: float = Field(default=30.0, gt=0, le=MAX_CARRIER_SECONDS)
    logistics_connect_timeout: float = Field(default=5.0, gt=0, le=MAX_CARRIER_SECONDS)
    logistics_read_timeout: float = Field(default=10.0, gt=0, le=MAX_CARRIER_SECONDS)
    # Seconds a SQLite writer waits for another program's lock before giving up (exit 69).
    sqlite_busy_timeout: float = Field(default=30.0, ge=0, le=24 * 3600)
    # How often `track sync` may ask the carrier about one express number (kuaidi100 locks a
    # number queried more often than about once in 30 minutes): 30m, 90s, 0s.
    track_min_interval: str = "30m"

    @field_validator("*", mode="before")
    @classmethod
    def _ascii_number(cls, value: object, info: ValidationInfo) -> object:
        # Every number setting (an int, float or Decimal field: found by its type, so a new one is
        # read the same way) is written as every number credex reads. pydantic alone takes what
        # Python's float() and int() take: an exponent (1e999999 overflowed the arithmetic of a
        # purchase, exit 70), `inf` (CREDEX_LOGISTICS_TOTAL_TIMEOUT=inf made `track` wait for ever
        # for a carrier that is down, instead of exit 69) and underscores (1_0).
        kind = cls.model_fields[info.field_name].annotation
        if not isinstance(value, str) or kind not in (int, float, Decimal):  # text settings as they are
            return value
        if kind is int:
            if not _WHOLE.fullmatch(value.strip()):
                raise ValueError("must be a whole number of ASCII digits, like 10")
        elif not _DECIMAL.fullmatch(value.strip()):
            raise ValueError("must be a decimal number of ASCII digits, like 1 or 0.5")
        return value


def get_settings(**overrides: object) -> Settings:
    """The settings, with command-line options (non-None values) taking precedence. A value that
    is not what its setting takes is bad input (exit 2) naming the setting, never its value."""
    from pydantic import ValidationError

    from credex.errors import InvalidInput

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        problem = error.errors()[0]
        name = str(problem["loc"][0]) if problem.get("loc") else "?"
        where = f"--{name.replace('_', '-')}" if name in overrides else f"CREDEX_{name.upper()}"
        raise InvalidInput(f"{where}: {problem['msg']}") from None
