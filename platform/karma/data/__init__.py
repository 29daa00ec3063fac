"""The data layer: canonical format, readers, the synthetic default set, splits into
compact examples and batching. See docs/DATA_FORMAT.md."""

from .compact import Examples, Sequences, read_examples, write_examples
from .examples import collate, epoch_order, item_counts, item_rows, sequence_positions
from .readers import SOURCES, load_source, read_movielens, read_parquet, read_recbole, write_parquet
from .schema import DataError, InteractionData, validate, validate_events, validate_items, validate_users
from .splits import Split, leave_one_out, recent_targets, time_split, validation_subset
from .synthetic import SyntheticConfig, generate

__all__ = [
    "DataError", "InteractionData", "validate", "validate_items", "validate_events", "validate_users",
    "read_parquet", "write_parquet", "read_recbole", "read_movielens", "load_source", "SOURCES",
    "SyntheticConfig", "generate",
    "Split", "leave_one_out", "recent_targets", "time_split", "validation_subset",
    "Examples", "Sequences", "read_examples", "write_examples",
    "sequence_positions", "item_rows", "item_counts", "collate", "epoch_order",
]
