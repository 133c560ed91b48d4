"""Data: offline media synthesis (`media`), the built-in task records and TFDS builder, grain pipelines."""
