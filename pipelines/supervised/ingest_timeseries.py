"""Stage `ingest_timeseries`: write one of the UCR/UEA time-series sets that the aeon
package bundles as the archive's own `.ts` files.

The files ship inside aeon (no download). Copying them to data/raw/timeseries puts them
under DVC's version control and sends them through the same `.ts` reader that users' own
archive files take, with the archive's official train/test split.
"""

from __future__ import annotations

import logging
import shutil
from typing import Annotated

from pipelines.stagekit.atomic import output_directory
from pipelines.stagekit.config import Param
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.sequences import bundled_sets
from pipelines.stagekit.stage import stage_command
from pipelines.supervised.timeseries_config import TimeseriesConfig

log = logging.getLogger(__name__)


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
