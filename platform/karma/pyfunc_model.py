"""The registered model's code, logged with MLflow's "models from code": `register_export`
passes this file's path as `python_model`, MLflow copies the file into the model version and
runs it at load time. Nothing of the model is pickled: the weights are the export folder
(safetensors, JSON, Parquet), logged as the artifact "export".

Input: a DataFrame with a "history" column of item-id lists and an optional "query" column.
Output: one flat list per row (the H interest embeddings of size d, row-major). The `karma`
package must be importable where the model is loaded.

Not imported by the `karma` package itself: loading this module registers the model with
`mlflow.models.set_model`.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import pandas as pd


class KarmaPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from karma.export import load_export  # lazy: heavy, and only needed when loading

        self._model = load_export(context.artifacts["export"])

    # The DataFrame hint tells MLflow not to infer a schema (history cells are lists).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[list[float]]:
        import numpy as np

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "history" not in frame.columns:
            raise ValueError(
                f"model input has columns {list(frame.columns)}; it needs a 'history' column "
                "of item-id lists (and optionally 'query')"
            )
        histories = [[int(i) for i in h] for h in frame["history"]]
        queries = [str(q) for q in frame["query"]] if "query" in frame.columns else None
        interests = np.asarray(self._model.interests(histories, queries))
        return [row.reshape(-1).tolist() for row in interests]


mlflow.models.set_model(KarmaPyfunc())
