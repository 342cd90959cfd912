"""`npr train rl CONFIG`: NPR-Zero (DAPO), NPR (PAPO) or the sequential-RL baseline from a YAML config.

Several processes: `torchrun --nproc-per-node N $(which npr) train rl CONFIG`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from npr.cli.train import train_app


@train_app.command("rl")
def rl_command(
    config: Annotated[Path, typer.Argument(help="RL config YAML (see configs/tiny_rl_papo.yaml).")],
) -> None:
    """RL with engine rollouts (resumes a killed run); prints the final checkpoint folder."""
    from npr.data import DataError
    from npr.train.config import ConfigError, RLConfig, load_config
    from npr.train.rl import train

    try:
        cfg = load_config(config, RLConfig)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="CONFIG") from None
    try:
        final = train(cfg)
    except (DataError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="CONFIG") from None
    typer.echo(final)
