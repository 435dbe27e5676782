"""User image–caption folders and WebDataset shards -> tfds ArrayRecord datasets, with a report
of every item normalised or skipped: `python -m mmjax.data.build` (`dataset.py`), its inputs
(`inputs.py`) and the per-image policy (`image_check.py`)."""
