"""Load the configuration from a TOML file, the relay password from the environment."""

import os
import tomllib

from mailstrom_async import Config, ConfigError


def load_config(path: str) -> Config:
    with open(path, "rb") as f:
        data = tomllib.load(f)["mailstrom"]
    # Secrets stay out of the file: add the password to what was read.
    if "SMTP_PASSWORD" in os.environ:
        data.setdefault("relay", {})["password"] = os.environ["SMTP_PASSWORD"]
    return Config.from_mapping(data)


def config_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        # exc.key is the dotted name of the offending setting, such as "relay.port".
        raise SystemExit(f"{path}: bad setting {exc.key}: {exc}") from None
