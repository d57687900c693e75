"""A Cortex RealtimeAPI handler, unchanged from what Cortex ran: the model
file is read from the project folder, the labels come from the config."""

import pickle

from cortex_internal.lib.log import logger


class Handler:
    def __init__(self, config):
        with open(config["model"], "rb") as f:
            self.model = pickle.load(f)
        self.labels = config["labels"]
        logger.info("model loaded", extra={"model": config["model"]})

    def handle_post(self, payload):
        # One sample as an object, or a list of them.
        samples = payload if isinstance(payload, list) else [payload]
        rows = [[s["sepal_length"], s["sepal_width"], s["petal_length"], s["petal_width"]]
                for s in samples]
        labels = [self.labels[int(i)] for i in self.model.predict(rows)]
        return labels if isinstance(payload, list) else labels[0]

    def handle_get(self):
        return {"labels": self.labels}
