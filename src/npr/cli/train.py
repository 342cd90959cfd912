"""`npr train sft|rl CONFIG`: run a training recipe from a YAML config (resumes a killed run).

Several processes: `torchrun --nproc-per-node N $(which npr) train sft CONFIG`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from npr.cli import app

train_app = typer.Typer(
    no_args_is_help=True, help="Train a model: parallel SFT (stage 2) or RL (stages 1, 3)."
)
app.add_typer(train_app, name="train")


@train_app.command("sft")
def sft_command(
    config: Annotated[Path, typer.Argument(help="SFT config YAML (see configs/tiny_sft.yaml).")],
) -> None:
    """Parallel SFT (NPR-Beta) or its sequential baseline; prints the final checkpoint folder."""
    from npr.data import DataError
    from npr.train.config import ConfigError, SFTConfig, load_config
    from npr.train.sft import train

    try:  # a bad config fails here, before the model loads; bad data right after
        final = train(load_config(config, SFTConfig))
    except (ConfigError, DataError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="CONFIG") from None
    typer.echo(final)


# ---- `npr train rl` lives in npr/cli/train_rl.py (the RL recipe's module): it imports `train_app` from here
# and registers `@train_app.command("rl")`; npr/cli/__init__.py imports both modules.
