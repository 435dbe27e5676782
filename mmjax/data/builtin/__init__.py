"""Datasets generated offline on first use (shapes, digits, moving shapes, reviews, word vectors):
each `<name>.py` holds the data and its `<name>_builder.py` the tfds builder; `common.py` the
build-once lock they share. Names are resolved in `mmjax.data.sources`."""
