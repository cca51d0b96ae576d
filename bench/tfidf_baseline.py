"""The bag-of-n-grams yardstick: TF-IDF (1-2 grams) + logistic regression, C chosen on validation.

    python bench/tfidf_baseline.py --data data/binary_sst/train.csv --valid data/binary_sst/val.csv \
        --test data/binary_sst/test.csv

``--train_rows a:b`` / ``--valid_rows a:b`` take row slices (e.g. a slice of one IMDB file for each).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from sentiment_discovery.readers import read_records


def rows(spec: str | None, n: int) -> slice:
    if not spec:
        return slice(0, n)
    a, b = spec.split(":")
    return slice(int(a or 0), int(b or n))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--valid", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--train_rows")
    p.add_argument("--valid_rows")
    args = p.parse_args()
    train, valid, test = (read_records(f, need_labels=True) for f in (args.data, args.valid, args.test))
    tr, va = rows(args.train_rows, len(train)), rows(args.valid_rows, len(valid))
    x_train, y_train = train.texts[tr], train.labels[tr]
    x_valid, y_valid = valid.texts[va], valid.labels[va]
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    f_train = vec.fit_transform(x_train)
    f_valid, f_test = vec.transform(x_valid), vec.transform(test.texts)
    best = None
    for C in 2.0 ** np.arange(-2, 8):
        clf = LogisticRegression(C=C, max_iter=2000).fit(f_train, y_train)
        acc = float((clf.predict(f_valid) == y_valid).mean())
        if best is None or acc > best[0]:
            best = (acc, C, clf)
    acc_val, C, clf = best
    acc_test = float((clf.predict(f_test) == test.labels).mean())
    print(json.dumps({"train": len(y_train), "valid": len(y_valid), "test": len(test.labels), "C": C,
                      "val_acc": acc_val, "test_acc": acc_test}))  # fmt: skip


if __name__ == "__main__":
    main()
