"""The parameter-free text baseline's query: a recency-weighted sum of the last items' text."""

import numpy as np
from conftest import load_script


def test_query_weights_the_newest_items_by_decay():
    knn = load_script("bench/text_knn.py")
    text = np.eye(4, dtype=np.float32)
    q = knn.queries(text, [[0, 1, 2, 3], [2]], n=3, decay=0.5)
    np.testing.assert_allclose(q[0], [0.0, 0.25, 0.5, 1.0])  # item 0 is beyond the last 3
    np.testing.assert_allclose(q[1], [0.0, 0.0, 1.0, 0.0])  # a short history uses what it has
    # ranking by cosine to this query puts the newest item first
    assert int(np.argmax(text @ q[0])) == 3
