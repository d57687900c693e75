"""Trains the iris classifier and writes model.pkl next to this file: the
project's build step, run before `serve deploy` (as a Cortex user trained
and uploaded a model before `cortex deploy`)."""

import os
import pickle

from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split


def main() -> None:
    iris = load_iris()
    x_train, x_test, y_train, y_test = train_test_split(
        iris.data, iris.target, test_size=0.2, random_state=0, stratify=iris.target)
    model = LogisticRegression(max_iter=1000).fit(x_train, y_train)
    print(f"test accuracy: {model.score(x_test, y_test):.3f}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.pkl")
    with open(out, "wb") as f:
        pickle.dump(model, f)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
