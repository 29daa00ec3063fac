"""The data layer: canonical format, readers, the synthetic default set, splits and
batching. See docs/DATA_FORMAT.md."""

from .examples import collate, epoch_order, item_counts, item_rows, make_examples, to_arrow
from .readers import SOURCES, load_source, read_movielens, read_parquet, read_recbole, write_parquet
from .schema import DataError, InteractionData, validate, validate_events, validate_items, validate_users
from .splits import Split, leave_one_out, time_split
from .synthetic import SyntheticConfig, generate

__all__ = [
    "DataError", "InteractionData", "validate", "validate_items", "validate_events", "validate_users",
    "read_parquet", "write_parquet", "read_recbole", "read_movielens", "load_source", "SOURCES",
    "SyntheticConfig", "generate",
    "Split", "leave_one_out", "time_split",
    "make_examples", "item_rows", "to_arrow", "item_counts", "collate", "epoch_order",
]
