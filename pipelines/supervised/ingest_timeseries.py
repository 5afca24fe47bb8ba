"""Stage `ingest_timeseries`: write one of the UCR/UEA time-series sets that the aeon
package bundles as the archive's own `.ts` files.

The files ship inside aeon (no download). Copying them to data/raw/timeseries puts them
under DVC's version control and sends them through the same `.ts` reader that users' own
archive files take, with the archive's official train/test split.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Annotated

from pipelines.stagekit.atomic import output_directory
from pipelines.stagekit.config import Param
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.stage import stage_command
from pipelines.supervised.timeseries_config import TimeseriesConfig

log = logging.getLogger(__name__)


def bundled_sets() -> dict[str, Path]:
    """Name -> folder of every set aeon bundles with both a _TRAIN.ts and a _TEST.ts file."""
    import aeon.datasets

    root = Path(aeon.datasets.__file__).parent / "data"
    return {
        folder.name: folder
        for folder in sorted(root.iterdir())
        if (folder / f"{folder.name}_TRAIN.ts").is_file()
        and (folder / f"{folder.name}_TEST.ts").is_file()
    }


def ingest_timeseries(
    config: Annotated[TimeseriesConfig, Param("timeseries", reads=("dataset",))],
    output: str = "data/raw/timeseries",
) -> None:
    sets = bundled_sets()
    if config.dataset not in sets:
        raise UserError(
            f"params.yaml: timeseries.dataset: {config.dataset!r} is not bundled with aeon; "
            f"choose one of {', '.join(sets)} (or set timeseries.source to your own files)"
        )
    with output_directory(output) as staging:
        for split in ("TRAIN", "TEST"):
            name = f"{config.dataset}_{split}.ts"
            shutil.copyfile(sets[config.dataset] / name, staging / name)
    log.info("wrote %s (the archive's train and test files) to %s", config.dataset, output)


if __name__ == "__main__":
    stage_command(ingest_timeseries)
