"""Lightning's model summary, without the FLOPs it has not counted."""

import logging

from lightning.pytorch import callbacks
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

# The logger of Lightning's own summary, so the table goes wherever Lightning's console output goes.
log = logging.getLogger(callbacks.model_summary.__name__)


class ModelSummary(callbacks.ModelSummary):
    """Lightning's ModelSummary, but a FLOPs column of zeros and "0 Total Flops" are left out.

    Lightning counts FLOPs only in a forward pass of `LightningModule.example_input_array`, which these
    modules do not set (a forward pass of a full-size net at start-up for a number nobody reads); without
    it the summary reports 0, which reads as a measurement. A module that sets an example input keeps both.
    """

    @staticmethod
    def summarize(
        summary_data,
        total_parameters,
        trainable_parameters,
        model_size,
        total_training_modes,
        total_flops,
        **summarize_kwargs,
    ) -> None:
        totals = (total_parameters, trainable_parameters, model_size, total_training_modes)
        if total_flops:
            return callbacks.ModelSummary.summarize(summary_data, *totals, total_flops, **summarize_kwargs)
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(*totals, 0, *columns)
        log.info("\n" + "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops")))
